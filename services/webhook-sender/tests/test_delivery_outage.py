"""Deliveries parked behind an attempt that Postgres failed under, through a proxy that
can cut the sender off from Postgres."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import make_url
from test_delivery import (
    SessionFactory,
    delivery_context,
    delivery_state,
    delivery_worker,
    wait_until,
)
from test_gates import _all_have_status, record_many

from mensajero_common.db import create_engine, create_session_factory
from mensajero_common.settings import Settings
from mensajero_common.testing import PostgresProxy, WebhookReceiver, scaled, serve_app
from mensajero_common.webhook_outbox import queue_deliveries
from mensajero_webhooks.delivery import repository
from mensajero_webhooks.delivery.backoff import RetryBackoff
from mensajero_webhooks.delivery.service import (
    DeliveryContext,
    released_job_id,
    start_drainers,
)


@asynccontextmanager
async def proxied_sessions(
    settings: Settings,
) -> AsyncIterator[tuple[PostgresProxy, Settings, SessionFactory]]:
    """Yield a proxy to the test database, settings whose DATABASE_URL goes through it,
    and a session factory on an engine of those settings."""
    url = make_url(settings.DATABASE_URL)
    proxy = PostgresProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied_url = url.set(host="127.0.0.1", port=proxy.port)
    proxied_settings = settings.model_copy(
        update={"DATABASE_URL": proxied_url.render_as_string(hide_password=False)}
    )
    engine = create_engine(proxied_settings, application_name="webhook-outage-test")
    try:
        yield proxy, proxied_settings, create_session_factory(engine)
    finally:
        await engine.dispose()
        await proxy.stop()


class HeldReceiver(WebhookReceiver):
    """A WebhookReceiver that records each request on arrival and delays every response
    until `release` is set."""

    def __init__(self) -> None:
        super().__init__([200])
        self.release = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return

        async def send_once_released(message: dict[str, Any]) -> None:
            await self.release.wait()
            await send(message)

        await super().__call__(scope, receive, send_once_released)


async def _parked_count_is(
    context: DeliveryContext, webhook_id: uuid.UUID, count: int
) -> bool:
    return context.gates.parked_count(webhook_id) == count


# Seconds that Postgres stays unreachable after the attempt that it failed.
OUTAGE_S = 2.0


async def test_parked_deliveries_resume_after_outage(
    settings: Settings, session_factory: SessionFactory
) -> None:
    settings = settings.model_copy(
        update={"WEBHOOK_CONCURRENCY_PER_WEBHOOK": 1, "WEBHOOK_TIMEOUT_S": 5.0}
    )
    receiver = HeldReceiver()
    async with (
        proxied_sessions(settings) as (proxy, proxied_settings, proxied_factory),
        serve_app(receiver) as base_url,
        delivery_worker(proxied_settings, proxied_factory) as context,
    ):
        first_id, *parked_ids = await record_many(
            session_factory, f"{base_url}/hook", 3
        )
        first, _ = await delivery_state(session_factory, first_id)
        webhook_id = first.webhook_id
        await queue_deliveries(context.redis, context.keys, [first_id])
        await receiver.wait_for(1, timeout_s=5)
        # The first attempt has taken the webhook's only slot, so these two are parked.
        await queue_deliveries(context.redis, context.keys, parked_ids)
        await wait_until(lambda: _parked_count_is(context, webhook_id, 2), 5)
        parked_at = datetime.now(UTC)
        parked_until = context.gates.parked_deliveries(webhook_id)

        # The first attempt gets its response while Postgres is unreachable, so its
        # record fails and its job raises.
        proxy.cut()
        receiver.release.set()
        await asyncio.sleep(OUTAGE_S)
        rejected_during_outage = proxy.rejected
        proxy.restore()
        restored_at = time.monotonic()
        await wait_until(
            lambda: _all_have_status(session_factory, parked_ids, "succeeded"), 10
        )
        resumed_after_s = time.monotonic() - restored_at
        first, first_attempts = await delivery_state(session_factory, first_id)

    # Without the drain tasks, the parked deliveries would wait for a later job of the
    # webhook: the sweep's retry of the first delivery once its lease has run out, or
    # the sweep's own job for each of them once its parking has.
    assert set(parked_until) == set(parked_ids)
    for until in parked_until.values():
        parked_for_s = (until - parked_at).total_seconds()
        assert parked_for_s > context.park_s - 5
    assert first.next_attempt_at is not None
    lease_left_s = (first.next_attempt_at - parked_at).total_seconds()
    assert lease_left_s > context.lease_s - 5
    assert resumed_after_s < scaled(5)
    # The retries back off: a few connection attempts in the outage, not one per loop.
    assert 1 <= rejected_during_outage <= 6
    assert len(receiver.requests) == 3
    assert len({body for _, body, _ in receiver.requests}) == 3
    for delivery_id in parked_ids:
        delivery, attempts = await delivery_state(session_factory, delivery_id)
        assert delivery.attempts == 1
        assert [attempt.status_code for attempt in attempts] == [200]
    # The first attempt's POST may have arrived, so it keeps its lease, and the sweep
    # queues it again once the lease has run out.
    assert first.status == "pending"
    assert first.attempts == 1
    assert first_attempts == []
    assert first.next_attempt_at > datetime.now(UTC)


async def test_close_ends_drain_task_in_backoff(
    settings: Settings, session_factory: SessionFactory
) -> None:
    async with delivery_context(settings, session_factory) as context:
        [delivery_id] = await record_many(session_factory, "http://127.0.0.1:9/hook", 1)
        delivery, _ = await delivery_state(session_factory, delivery_id)
        webhook_id = delivery.webhook_id
        async with repository.pooled_connection(context.engine) as connection:
            parked = await repository.claim(
                connection, delivery_id, lease_s=30, blocked={webhook_id: 60}
            )
        assert isinstance(parked, repository.ParkedDelivery)
        context.gates.park(webhook_id, delivery_id, parked.parked_until)
        # A transient failure just happened, and the next retry is a minute away.
        context.backoff = RetryBackoff(base_delay_s=60, max_delay_s=60)
        context.backoff.record_failure()
        start_drainers(context, webhook_id)
        [drain_task] = context.drain_tasks

        started = time.monotonic()
        await context.close(wait_s=scaled(30))
        close_s = time.monotonic() - started
        job_id = released_job_id(context.keys, delivery_id, 1)
        queued_at = await context.redis.zscore(context.keys.arq_queue, job_id)

    released, attempts = await delivery_state(session_factory, delivery_id)
    assert drain_task.done()
    assert close_s < scaled(2)
    assert queued_at is not None
    assert released.status == "pending"
    assert released.attempts == 0
    assert attempts == []
    assert released.next_attempt_at is not None
    assert released.next_attempt_at <= datetime.now(UTC)
