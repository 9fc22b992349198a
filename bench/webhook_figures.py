"""Webhook figures: deliveries per second, alone and with one endpoint timing out.

Events are recorded with the outbox function that the services use
(webhook_outbox.record_message_event). They are queued with queue_deliveries, as the hub
does after its commit, and the webhook-sender process delivers them to bench.tools.sink.
"""

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bench.console import say
from bench.procs import Proc, wait_healthy
from bench.raw import BODY
from bench.results import Figure
from bench.stack import BenchUser, Stack, create_users
from mensajero_common.db import create_session_factory
from mensajero_common.keys import RedisKeys
from mensajero_common.testing import free_port
from mensajero_common.webhook_outbox import queue_deliveries, record_message_event
from mensajero_common.webhooks import EVENT_SMS_RECEIVED

if TYPE_CHECKING:
    from bench.run import Run

FAST_ENDPOINTS = 4
EVENTS_PER_TRANSACTION = 500
QUEUE_CONCURRENCY = 8
ALL_DELIVERED_TIMEOUT_S = 120.0


async def start_sink(run: "Run") -> tuple[Proc, int]:
    port = free_port()
    sink = await run.processes.start_tool("sink", "sink", {"port": port})
    await wait_healthy(f"http://127.0.0.1:{port}/stats", sink)
    return sink, port


async def _create_webhooks(
    client: httpx.AsyncClient, users: list[BenchUser], urls: list[str]
) -> None:
    for user, url in zip(users, urls, strict=True):
        response = await client.post(
            "/api/v1/sms/webhooks",
            json={"url": url, "events": [EVENT_SMS_RECEIVED]},
            headers=user.headers,
        )
        if response.status_code >= 300:
            raise RuntimeError(f"webhook creation failed: {response.text}")


async def _record_events(
    run: "Run", users: list[BenchUser], total: int
) -> list[uuid.UUID]:
    """Record `total` sms_received events spread evenly over `users`; return delivery ids."""
    engine = create_async_engine(run.data.database_url, poolclass=NullPool)
    sessions = create_session_factory(engine)
    delivery_ids: list[uuid.UUID] = []
    try:
        for start in range(0, total, EVENTS_PER_TRANSACTION):
            async with sessions() as session:
                for number in range(start, min(total, start + EVENTS_PER_TRANSACTION)):
                    user = users[number % len(users)]
                    delivery_ids += await record_message_event(
                        session,
                        event=EVENT_SMS_RECEIVED,
                        user_id=user.user_id,
                        message_id=uuid.uuid4(),
                        from_number="+34600000001",
                        to_number="+34600000002",
                        body=BODY,
                        timestamp=datetime.now(UTC),
                        device_id=None,
                        status="received",
                    )
                await session.commit()
    finally:
        await engine.dispose()
    return delivery_ids


async def _queue(
    redis: ArqRedis, keys: RedisKeys, delivery_ids: list[uuid.UUID]
) -> None:
    chunks = [delivery_ids[i::QUEUE_CONCURRENCY] for i in range(QUEUE_CONCURRENCY)]
    await asyncio.gather(*(queue_deliveries(redis, keys, chunk) for chunk in chunks))


async def _sink_stats(client: httpx.AsyncClient) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = (await client.get("/stats")).json()
    return stats


async def _deliver(
    run: "Run",
    users: list[BenchUser],
    fast_names: list[str],
    total: int,
    sink_port: int,
    window_s: float,
) -> dict[str, Any]:
    """Queue `total` deliveries and return how fast the fast endpoints received theirs."""
    fast_expected = sum(
        1
        for number in range(total)
        if users[number % len(users)] in users[: len(fast_names)]
    )
    redis = ArqRedis.from_url(run.data.redis_url)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sink_port}") as sink:
        # Reset before the deliveries are committed: the sender's sweep may queue and
        # send some of them before _queue does, and their arrivals must count.
        await sink.post("/reset")
        delivery_ids = await _record_events(run, users, total)
        before = run.cpu_snapshot()
        queued_at = time.monotonic()
        await _queue(redis, run.data.keys, delivery_ids)
        queue_s = time.monotonic() - queued_at
        deadline = queued_at + window_s
        while True:
            stats = await _sink_stats(sink)
            received = sum(stats.get(name, {}).get("count", 0) for name in fast_names)
            if received >= fast_expected or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        ended_at = time.monotonic()
        cpu = run.cpu_used(before, run.cpu_snapshot())
    await redis.aclose()
    last = max(
        (stats[name]["last"] for name in fast_names if name in stats), default=ended_at
    )
    # The sink's times come from the same monotonic clock. A delivery that the sweep
    # sent before _queue began starts the window early.
    first = min(
        (stats[name]["first"] for name in fast_names if name in stats),
        default=queued_at,
    )
    elapsed_s = (last if received >= fast_expected else ended_at) - min(
        first, queued_at
    )
    return {
        "deliveries": len(delivery_ids),
        "fast_expected": fast_expected,
        "fast_received": int(received),
        "slow_received": int(stats.get("slow", {}).get("count", 0)),
        "queue_s": round(queue_s, 3),
        "elapsed_s": round(elapsed_s, 3),
        "rate_per_s": round(received / elapsed_s, 1) if elapsed_s > 0 else None,
        "cpu_s_by_process": cpu,
    }


async def measure_webhooks(
    run: "Run", stack: Stack, sink: Proc, sink_port: int
) -> None:
    say("figure: webhook deliveries per second")
    mode = run.mode
    sink_url = f"http://127.0.0.1:{sink_port}"
    fast_names = [f"fast/{index}" for index in range(FAST_ENDPOINTS)]
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as client:
        users = await create_users(client, run.data.dsn, "webhook", FAST_ENDPOINTS + 1)
        await _create_webhooks(
            client,
            users,
            [f"{sink_url}/{name}" for name in fast_names] + [f"{sink_url}/slow"],
        )

    baseline = run.baselines["httpx_webhook"]["rate_per_s"]
    alone = await _deliver(
        run,
        users[:FAST_ENDPOINTS],
        fast_names,
        mode.webhook_deliveries,
        sink_port,
        ALL_DELIVERED_TIMEOUT_S,
    )
    run.measurements["webhooks_alone"] = alone
    run.report.add(
        Figure(
            "webhook_delivery_rate",
            "webhook deliveries per second",
            alone["rate_per_s"],
            "deliveries/s",
            "ratio>=",
            0.8,
            baseline=baseline,
            baseline_title="raw httpx rate",
            note=f"{alone['fast_received']} deliveries over {FAST_ENDPOINTS} endpoints",
        )
    )

    say("figure: webhook deliveries with one endpoint timing out")
    with_slow = await _deliver(
        run,
        users,
        fast_names,
        mode.webhook_deliveries,
        sink_port,
        mode.webhook_timeout_window_s,
    )
    run.measurements["webhooks_with_timeout"] = with_slow
    await _disable_slow_webhook(run, users[-1])
    complete = with_slow["fast_received"] >= with_slow["fast_expected"]
    run.report.add(
        Figure(
            "webhook_delivery_rate_with_timeout",
            "webhook deliveries per second, one endpoint timing out",
            with_slow["rate_per_s"],
            "deliveries/s",
            "ratio>=",
            0.7,
            baseline=baseline,
            baseline_title="raw httpx rate",
            note=(
                f"1 of {FAST_ENDPOINTS + 1} endpoints never answers within the "
                f"webhook timeout; {with_slow['fast_received']} of "
                f"{with_slow['fast_expected']} other deliveries arrived"
                + ("" if complete else f" within {mode.webhook_timeout_window_s:g} s")
            ),
        )
    )


async def _disable_slow_webhook(run: "Run", user: BenchUser) -> None:
    """Cancel the retries of the timing-out endpoint, so they do not load what follows."""
    engine = create_async_engine(run.data.database_url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "UPDATE webhookconfig SET is_active = false WHERE user_id = :user_id"
                ),
                {"user_id": user.user_id},
            )
    finally:
        await engine.dispose()
