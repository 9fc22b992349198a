"""The raw baselines, measured first and with the same payloads as the figures.

- Redis: XADD rate, XADD-to-blocked-reader latency.
- Postgres: single-row INSERT + COMMIT rate over the API's pool size, the latency of one,
  and 1000 rows in one batch by COPY and by executemany.
- A bare ASGI app (bench.tools.bare_asgi): its maximum rate under the same load generator
  and concurrency as the API, and its latency at half that rate.
- A bare WebSocket server (bench.tools.bare_ws): memory per idle connection, CPU per
  ping, one-way push latency.
- httpx POSTs to the webhook sink at the webhook-sender's concurrency.
"""

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bench import raw
from bench.console import say
from bench.procs import Proc, wait_healthy
from bench.stats import lowest_percentiles
from mensajero_api.auth.security import create_access_token
from mensajero_common.settings import Settings
from mensajero_common.testing import free_port
from mensajero_common.webhook_outbox import build_event_body
from mensajero_common.webhooks import EVENT_SMS_RECEIVED, signature_headers

if TYPE_CHECKING:
    from bench.run import Run

SEND_BODY_TEMPLATE = '{"to":"+3460%N%","body":"' + raw.BODY + '"}'
# The API's engine: pool_size 10 with max_overflow 10 (mensajero_common.db.create_engine).
API_DB_CONNECTIONS = 20
WEBHOOK_SECRET = "whsec_benchmarksecretbenchmarksecret"


def sample_token() -> str:
    """Return a bearer token in the API's format, for servers that ignore it."""
    settings = Settings(
        _env_file=None, SECRET_KEY="bench-secret-key-that-is-long-enough"
    )
    return create_access_token(uuid.uuid4(), 0, settings).token


def sample_webhook_request() -> tuple[str, dict[str, str]]:
    """Return the body and headers of one signed `sms_received` delivery."""
    event_id = uuid.uuid4()
    body = build_event_body(
        event=EVENT_SMS_RECEIVED,
        event_id=event_id,
        message_id=uuid.uuid4(),
        from_number="+34600000001",
        to_number="+34600000002",
        body=raw.BODY,
        timestamp=datetime.now(UTC),
        device_id=uuid.uuid4(),
        status="received",
    )
    headers = signature_headers(WEBHOOK_SECRET, str(event_id), int(time.time()), body)
    return body.decode(), headers


async def measure_storage(run: "Run") -> None:
    mode, data = run.mode, run.data
    stream = f"{data.prefix}:raw:stream"
    say("baseline: Redis")
    run.baselines["redis_xadd"] = await raw.redis_xadd_rate(
        data.redis_url, stream, mode.http_concurrency, mode.measure_s / 2
    )
    run.baselines["redis_xadd_to_reader"] = _lowest_latency(
        [
            await raw.redis_xadd_to_reader_latency(
                data.redis_url, stream, mode.latency_samples
            )
            for _ in range(mode.latency_repeats)
        ]
    )

    say("baseline: Postgres")
    owner = await raw.create_raw_table(data.dsn, mode.senders)
    run.baselines["postgres_insert_commit"] = await raw.postgres_insert_commit_rate(
        data.dsn, owner, API_DB_CONNECTIONS, mode.measure_s
    )
    run.baselines["postgres_commit_latency"] = _lowest_latency(
        [
            await raw.postgres_commit_latency(data.dsn, owner, mode.latency_samples)
            for _ in range(mode.latency_repeats)
        ]
    )
    run.baselines["postgres_1000_rows"] = await raw.postgres_batch_insert(
        data.dsn, owner, 1000, max(3, mode.bulk_requests)
    )
    await raw.drop_raw_table(data.dsn, owner)


async def measure_bare_asgi(run: "Run") -> None:
    say("baseline: bare ASGI")
    port = free_port()
    server = await run.processes.start_tool("bare-asgi", "bare_asgi", {"port": port})
    try:
        await wait_healthy(f"http://127.0.0.1:{port}/healthz", server)
        target = {
            "host": "127.0.0.1",
            "port": port,
            "path": "/api/v1/sms/send",
            "body_template": SEND_BODY_TEMPLATE,
            "headers": [{"Authorization": f"Bearer {sample_token()}"}],
        }
        closed = await run.measure_tool(
            "bare-asgi-load",
            "http_load",
            {
                **target,
                "mode": "closed",
                "concurrency": run.mode.http_concurrency,
                "warmup_s": run.mode.warmup_s,
                "duration_s": run.mode.measure_s,
            },
            [server],
        )
        half_rate = max(1.0, closed["rate_per_s"] / 2)
        runs = []
        for repeat in range(1, run.mode.latency_repeats + 1):
            runs.append(
                await run.measure_tool(
                    "bare-asgi-latency"
                    if repeat == 1
                    else f"bare-asgi-latency-{repeat}",
                    "http_load",
                    {
                        **target,
                        "mode": "open",
                        "rate_per_s": half_rate,
                        "concurrency": run.mode.http_concurrency,
                        "warmup_s": run.mode.warmup_s,
                        "duration_s": run.mode.measure_s,
                    },
                    [server],
                )
            )
        run.baselines["bare_asgi"] = {"max": closed, "half_rate": _lowest_latency(runs)}
    finally:
        await run.processes.stop(server)


async def measure_bare_websocket(run: "Run") -> None:
    say("baseline: bare WebSocket server")
    port = free_port()
    server = await run.processes.start_tool("bare-ws", "bare_ws", {"port": port})
    clients: list[Proc] = []
    try:
        await wait_healthy(f"http://127.0.0.1:{port}/", server)
        await asyncio.sleep(0.5)
        idle = await run.hold_idle_connections(
            server,
            port,
            path="/",
            api_keys=None,
            count=run.mode.bare_idle_connections,
            ping_interval_s=run.mode.ping_interval_s(run.mode.bare_idle_connections),
            window_s=min(run.mode.heartbeat_window_s, 10.0),
            clients=clients,
            name="bare-ws-clients",
        )
        probe = _lowest_latency(
            [
                await clients[0].command(
                    "probe", count=run.mode.latency_samples, interval_s=0.002
                )
                for _ in range(run.mode.latency_repeats)
            ]
        )
        run.baselines["bare_websocket"] = {**idle, "push": probe}
    finally:
        for client in clients:
            await client.command("stop", timeout_s=60)
            await run.processes.stop(client)
        await run.processes.stop(server)


async def measure_webhook_baseline(run: "Run", sink_port: int, sink: Proc) -> None:
    say("baseline: httpx to the webhook sink")
    body, headers = sample_webhook_request()
    concurrency = Settings(_env_file=None).WEBHOOK_CONCURRENCY
    result = await run.measure_tool(
        "httpx-sink-load",
        "httpx_load",
        {
            "url": f"http://127.0.0.1:{sink_port}/fast/baseline",
            "concurrency": concurrency,
            "body": body,
            "headers": headers,
            "warmup_s": run.mode.warmup_s,
            "duration_s": run.mode.measure_s,
        },
        [sink],
    )
    run.baselines["httpx_webhook"] = {"concurrency": concurrency, **result}


def _lowest_latency(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the first of repeated latency measurements, with each percentile of
    `latency_ms` the lowest of all runs, and every run's own under `runs_latency_ms`."""
    return {
        **runs[0],
        "latency_ms": lowest_percentiles([item["latency_ms"] for item in runs]),
        "runs_latency_ms": [item["latency_ms"] for item in runs],
    }


def latency_sum_ms(baselines: dict[str, Any], percentile: str) -> float:
    """Sum one percentile of the raw steps between a POST and its task at the phone."""
    return float(
        baselines["bare_asgi"]["half_rate"]["latency_ms"][percentile]
        + baselines["postgres_commit_latency"]["latency_ms"][percentile]
        + baselines["redis_xadd_to_reader"]["latency_ms"][percentile]
        + baselines["bare_websocket"]["push"]["latency_ms"][percentile]
    )
