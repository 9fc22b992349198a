"""Counts and durations of the quick and full modes."""

import os
from dataclasses import dataclass

# Pings per second that 50,000 phones send at the default WEBSOCKET_PING_INTERVAL (60 s);
# each mode picks its ping interval so that its idle phones send about this many.
FULL_SCALE_PINGS_PER_S = 50_000 / 60


@dataclass(frozen=True)
class Mode:
    name: str
    # Each rate is measured for `measure_s` after `warmup_s` of the same load.
    warmup_s: float
    measure_s: float
    # Connections of the HTTP load generator, for the baseline and the API alike.
    http_concurrency: int
    # Users that send, each with an equal share of the phones.
    senders: int
    phones: int
    # Delivered messages already in the database when the API figures start.
    history_messages: int
    bulk_requests: int
    dispatcher_burst: int
    # Idle WebSocket connections held by one device-hub process, and by the bare server.
    idle_connections: int
    bare_idle_connections: int
    heartbeat_window_s: float
    webhook_deliveries: int
    webhook_timeout_window_s: float
    latency_samples: int
    # The raw latency steps run this many times and keep each percentile's lowest, so
    # that a burst of other work during one run cannot inflate the latency baseline.
    latency_repeats: int

    def ping_interval_s(self, connections: int) -> int:
        """Return the whole-second ping interval that makes `connections` phones send
        about FULL_SCALE_PINGS_PER_S (WEBSOCKET_PING_INTERVAL is in whole seconds)."""
        return max(1, round(connections / FULL_SCALE_PINGS_PER_S))


QUICK = Mode(
    name="quick",
    warmup_s=1.0,
    measure_s=3.0,
    http_concurrency=32,
    senders=8,
    phones=200,
    history_messages=20_000,
    bulk_requests=3,
    dispatcher_burst=300,
    # The bare server's memory per connection reads low with few connections (13.5 KiB
    # at 500, 16.9 at 2,000, 18.8 at 10,000), which makes the ratio read high.
    idle_connections=2000,
    bare_idle_connections=2000,
    heartbeat_window_s=5.0,
    webhook_deliveries=300,
    webhook_timeout_window_s=6.0,
    latency_samples=200,
    latency_repeats=2,
)

FULL = Mode(
    name="full",
    warmup_s=3.0,
    measure_s=15.0,
    http_concurrency=32,
    senders=8,
    phones=1000,
    history_messages=100_000,
    bulk_requests=10,
    dispatcher_burst=3000,
    idle_connections=50_000,
    bare_idle_connections=10_000,
    heartbeat_window_s=60.0,
    webhook_deliveries=3000,
    webhook_timeout_window_s=30.0,
    latency_samples=2000,
    latency_repeats=3,
)


def current_mode() -> Mode:
    name = os.environ.get("BENCH_MODE", "quick").strip().lower() or "quick"
    modes = {QUICK.name: QUICK, FULL.name: FULL}
    if name not in modes:
        raise SystemExit(f"invalid BENCH_MODE {name!r}; expected quick or full")
    return modes[name]
