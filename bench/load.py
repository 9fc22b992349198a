"""Closed-loop, open-loop and fixed-count HTTP load on the raw client, with latencies.

- closed loop: `concurrency` connections each send the next request as soon as the last
  one is answered; this finds the maximum rate.
- open loop: requests start on a fixed schedule (`rate` per second) whatever the server
  does, and latency counts from the scheduled start, so a slow server cannot hide its
  queueing by slowing the generator down.
- count: `total` requests over `concurrency` connections as fast as they go (a burst).

Requests whose start falls in the warm-up are sent but not counted.
"""

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.rawhttp import HttpConnection, Response, ResponseError, build_request
from bench.stats import summarize_ms

# Placeholder in a body template that each request replaces with a counter.
COUNTER_PLACEHOLDER = "%N%"
MAX_ERROR_SAMPLES = 5


@dataclass
class Target:
    host: str
    port: int
    path: str
    # A JSON body with COUNTER_PLACEHOLDER for a per-request number (7 digits).
    body_template: str
    # Extra headers of each simulated client (e.g. one Authorization per user); the
    # connections take them in turn.
    headers: list[dict[str, str]]
    local_addresses: list[str] | None = None

    def request_factory(self, client_index: int) -> Callable[[int], bytes]:
        headers = self.headers[client_index % len(self.headers)]
        prefix, _, suffix = self.body_template.partition(COUNTER_PLACEHOLDER)
        has_counter = COUNTER_PLACEHOLDER in self.body_template

        def build(number: int) -> bytes:
            text = (
                f"{prefix}{number % 10_000_000:07d}{suffix}" if has_counter else prefix
            )
            return build_request(
                "POST", self.host, self.port, self.path, text.encode(), headers
            )

        return build

    def connection(self, index: int) -> HttpConnection:
        local = None
        if self.local_addresses:
            local = self.local_addresses[index % len(self.local_addresses)]
        return HttpConnection(self.host, self.port, local)


@dataclass
class LoadResult:
    ok: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    first_ok_at: float | None = None
    last_ok_at: float | None = None
    measured_s: float = 0.0
    # Response bodies of counted successful requests, when the caller asked for them.
    bodies: list[tuple[float, bytes]] = field(default_factory=list)

    def record(
        self,
        started_at: float,
        response: Response | None,
        error: str | None,
        keep_body: bool,
    ) -> None:
        finished_at = time.monotonic()
        if response is None:
            self.transport_errors += 1
            if error and len(self.error_samples) < MAX_ERROR_SAMPLES:
                self.error_samples.append(error)
            return
        self.statuses[response.status] += 1
        if not 200 <= response.status < 300:
            if len(self.error_samples) < MAX_ERROR_SAMPLES:
                self.error_samples.append(
                    f"{response.status} {response.body[:300].decode(errors='replace')}"
                )
            return
        self.ok += 1
        self.latencies_ms.append((finished_at - started_at) * 1000)
        if self.first_ok_at is None:
            self.first_ok_at = finished_at
        self.last_ok_at = finished_at
        if keep_body:
            self.bodies.append((started_at, response.body))

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "statuses": {str(code): count for code, count in self.statuses.items()},
            "transport_errors": self.transport_errors,
            "error_samples": self.error_samples,
            "measured_s": round(self.measured_s, 3),
            "rate_per_s": round(self.ok / self.measured_s, 1) if self.measured_s else 0,
            "latency_ms": summarize_ms(self.latencies_ms),
            "first_ok_at": self.first_ok_at,
            "last_ok_at": self.last_ok_at,
        }


async def _send(
    connection: HttpConnection, raw: bytes
) -> tuple[Response | None, str | None]:
    try:
        return await connection.request(raw), None
    except (OSError, ResponseError, asyncio.IncompleteReadError) as error:
        await connection.close()
        return None, repr(error)


async def _open_connections(target: Target, count: int) -> list[HttpConnection]:
    connections = [target.connection(index) for index in range(count)]
    await asyncio.gather(*(connection.connect() for connection in connections))
    return connections


async def _close_all(connections: list[HttpConnection]) -> None:
    await asyncio.gather(*(connection.close() for connection in connections))


async def closed_loop(
    target: Target,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    counter_start: int = 0,
) -> LoadResult:
    """Keep `concurrency` requests in flight; count those started after the warm-up."""
    result = LoadResult()
    numbers = itertools.count(counter_start)
    connections = await _open_connections(target, concurrency)
    start = time.monotonic()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    async def client(index: int) -> None:
        build = target.request_factory(index)
        connection = connections[index]
        while (started_at := time.monotonic()) < stop_at:
            response, error = await _send(connection, build(next(numbers)))
            if started_at >= measure_from:
                result.record(started_at, response, error, keep_body=False)

    await asyncio.gather(*(client(index) for index in range(concurrency)))
    result.measured_s = duration_s
    await _close_all(connections)
    return result


async def fixed_count(
    target: Target, concurrency: int, total: int, counter_start: int = 0
) -> LoadResult:
    """Send exactly `total` requests over `concurrency` connections, as fast as they go."""
    result = LoadResult()
    numbers = iter(range(counter_start, counter_start + total))
    connections = await _open_connections(target, concurrency)
    start = time.monotonic()

    async def client(index: int) -> None:
        build = target.request_factory(index)
        connection = connections[index]
        for number in numbers:
            started_at = time.monotonic()
            response, error = await _send(connection, build(number))
            result.record(started_at, response, error, keep_body=False)

    await asyncio.gather(*(client(index) for index in range(concurrency)))
    result.measured_s = time.monotonic() - start
    await _close_all(connections)
    return result


async def open_loop(
    target: Target,
    rate_per_s: float,
    warmup_s: float,
    duration_s: float,
    max_connections: int,
    *,
    keep_bodies: bool = False,
    counter_start: int = 0,
) -> LoadResult:
    """Start requests at `rate_per_s` on a schedule; latency counts from the schedule.

    A request whose slot comes while every connection is busy waits for one, and its
    wait counts in its latency. More than `max_connections` busy means the server is
    past its capacity, which the caller sees as growing latency.
    """
    result = LoadResult()
    connections = await _open_connections(target, max_connections)
    idle: asyncio.Queue[int] = asyncio.Queue()
    for index in range(max_connections):
        idle.put_nowait(index)
    factories = [target.request_factory(index) for index in range(max_connections)]
    interval_s = 1.0 / rate_per_s
    total = int((warmup_s + duration_s) * rate_per_s)
    measured_from_number = int(warmup_s * rate_per_s)
    start = time.monotonic()
    in_flight: set[asyncio.Task[None]] = set()

    async def one(number: int, scheduled_at: float) -> None:
        index = await idle.get()
        try:
            raw = factories[index](counter_start + number)
            response, error = await _send(connections[index], raw)
        finally:
            idle.put_nowait(index)
        if number >= measured_from_number:
            result.record(scheduled_at, response, error, keep_body=keep_bodies)

    for number in range(total):
        scheduled_at = start + number * interval_s
        delay_s = scheduled_at - time.monotonic()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        task = asyncio.create_task(one(number, scheduled_at))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)
    result.measured_s = duration_s
    await _close_all(connections)
    return result
