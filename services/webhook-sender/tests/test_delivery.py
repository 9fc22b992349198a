import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common import jsonutil
from mensajero_common.keys import RedisKeys
from mensajero_common.models import (
    MessageStatus,
    MessageType,
    SMSMessage,
    User,
    WebhookAttempt,
    WebhookConfig,
    WebhookDelivery,
)
from mensajero_common.redis import create_redis
from mensajero_common.settings import Settings
from mensajero_common.testing import WebhookReceiver, scaled, serve_app
from mensajero_common.webhook_outbox import queue_deliveries, record_message_event
from mensajero_common.webhooks import (
    DISABLED_GONE,
    EVENT_SMS_RECEIVED,
    generate_secret,
    verify,
)
from mensajero_webhooks.delivery import repository
from mensajero_webhooks.delivery.http_client import create_http_session
from mensajero_webhooks.delivery.service import (
    DeliveryContext,
    _claim,
    attempt_delivery,
    released_job_id,
    requeue_due_deliveries,
)
from mensajero_webhooks.delivery.tasks import job_functions
from mensajero_webhooks.main import SWEEP_TIMEOUT_S
from mensajero_webhooks.worker import DeliveryWorker

SessionFactory = async_sessionmaker[AsyncSession]


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"WEBHOOK_RETRY_BASE_DELAY_S": 0.3, "WEBHOOK_TIMEOUT_S": 2.0}
    )


@asynccontextmanager
async def delivery_worker(
    settings: Settings, session_factory: SessionFactory, max_jobs: int = 10
) -> AsyncIterator[DeliveryContext]:
    """Run a real arq worker with the webhook-sender's jobs until the block ends."""
    redis = create_redis(settings)
    keys = RedisKeys(settings.REDIS_KEY_PREFIX)
    async with create_http_session(settings) as http:
        engine = session_factory.kw["bind"]
        context = DeliveryContext(settings, keys, engine, session_factory, redis, http)
        worker = DeliveryWorker(
            job_functions(settings.WEBHOOK_TIMEOUT_S + 5, SWEEP_TIMEOUT_S),
            redis_pool=redis,
            queue_name=keys.arq_queue,
            ctx={"delivery": context},
            poll_delay=0.05,
            handle_signals=False,
            keep_result=0,
            max_jobs=max_jobs,
        )
        task = asyncio.create_task(worker.async_run())
        try:
            yield context
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            # close() cancels the jobs still running and then re-raises their
            # CancelledError, so let the ones that are finishing end first.
            running = [job for job in worker.tasks.values() if not job.done()]
            if running:
                await asyncio.wait(running, timeout=scaled(5))
            worker.tasks = {
                job_id: job for job_id, job in worker.tasks.items() if not job.done()
            }
            await context.close(wait_s=0)
            await worker.close()
            await redis.aclose()


@asynccontextmanager
async def delivery_context(
    settings: Settings, session_factory: SessionFactory
) -> AsyncIterator[DeliveryContext]:
    """A DeliveryContext with no worker taking jobs, for tests that run attempts directly."""
    redis = create_redis(settings)
    keys = RedisKeys(settings.REDIS_KEY_PREFIX)
    async with create_http_session(settings) as http:
        engine = session_factory.kw["bind"]
        try:
            yield DeliveryContext(settings, keys, engine, session_factory, redis, http)
        finally:
            await redis.aclose()


async def create_user_with_webhook(
    session_factory: SessionFactory, url: str, secret: str
) -> tuple[User, WebhookConfig]:
    async with session_factory() as session:
        user = User(email=f"{uuid.uuid4().hex}@example.com", hashed_password="x")
        session.add(user)
        await session.flush()
        webhook = WebhookConfig(
            user_id=user.id, url=url, secret_key=secret, events=[EVENT_SMS_RECEIVED]
        )
        session.add(webhook)
        await session.commit()
        return user, webhook


async def record_incoming(
    session_factory: SessionFactory, user: User, body: str = "Hola <b> & ñ 😀"
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    received_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    async with session_factory() as session:
        message = SMSMessage(
            user_id=user.id,
            type=MessageType.INCOMING,
            status=MessageStatus.RECEIVED,
            from_number="+34600000001",
            to_number="+34600000002",
            body=body,
            received_at=received_at,
        )
        session.add(message)
        await session.flush()
        delivery_ids = await record_message_event(
            session,
            event=EVENT_SMS_RECEIVED,
            user_id=user.id,
            message_id=message.id,
            from_number=message.from_number,
            to_number=message.to_number,
            body=body,
            timestamp=received_at,
            device_id=None,
        )
        await session.commit()
        return message.id, delivery_ids


async def wait_until(predicate: Callable[[], Any], timeout_s: float) -> None:
    # The state lives in Postgres, which has no change notification to wait on.
    async with asyncio.timeout(scaled(timeout_s)):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def delivery_state(
    session_factory: SessionFactory, delivery_id: uuid.UUID
) -> tuple[WebhookDelivery, list[WebhookAttempt]]:
    async with session_factory() as session:
        delivery = await session.get_one(WebhookDelivery, delivery_id)
        attempts = (
            await session.scalars(
                select(WebhookAttempt)
                .where(WebhookAttempt.delivery_id == delivery_id)
                .order_by(WebhookAttempt.attempt_number)
            )
        ).all()
        return delivery, list(attempts)


async def test_received_sms_arrives_signed(
    fast_settings: Settings, session_factory: SessionFactory
) -> None:
    receiver = WebhookReceiver([200])
    secret = generate_secret()
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(fast_settings, session_factory) as context,
    ):
        user, _ = await create_user_with_webhook(
            session_factory, f"{base_url}/hook", secret
        )
        message_id, delivery_ids = await record_incoming(session_factory, user)
        await queue_deliveries(context.redis, context.keys, delivery_ids)
        await receiver.wait_for(1, timeout_s=5)
        await wait_until(
            lambda: _status_is(session_factory, delivery_ids[0], "succeeded"), 5
        )

    headers, body, _ = receiver.requests[0]
    payload = jsonutil.loads(body)
    assert verify(
        secret,
        int(headers["x-webhook-timestamp"]),
        body,
        headers["x-webhook-signature"],
    )
    assert payload["event"] == "sms_received"
    assert payload["message_id"] == str(message_id)
    assert payload["from"] == "+34600000001"
    assert payload["body"] == "Hola <b> & ñ 😀"
    assert payload["timestamp"] == "2026-01-02T03:04:05Z"
    assert headers["x-webhook-id"] == payload["event_id"]
    async with session_factory() as session:
        message = await session.get_one(SMSMessage, message_id)
        assert message.webhook_sent is True


async def _status_is(
    session_factory: SessionFactory, delivery_id: uuid.UUID, status: str
) -> bool:
    delivery, _ = await delivery_state(session_factory, delivery_id)
    return delivery.status == status


async def test_delivery_retries_with_growing_gaps(
    fast_settings: Settings, session_factory: SessionFactory
) -> None:
    receiver = WebhookReceiver([500, 503, 200])
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(fast_settings, session_factory) as context,
    ):
        user, _ = await create_user_with_webhook(
            session_factory, f"{base_url}/hook", generate_secret()
        )
        _, delivery_ids = await record_incoming(session_factory, user)
        await queue_deliveries(context.redis, context.keys, delivery_ids)
        await wait_until(
            lambda: _status_is(session_factory, delivery_ids[0], "succeeded"), 10
        )

    delivery, attempts = await delivery_state(session_factory, delivery_ids[0])
    assert delivery.attempts == 3
    assert [attempt.status_code for attempt in attempts] == [500, 503, 200]
    assert attempts[0].next_retry_at is not None
    assert attempts[2].next_retry_at is None
    first_gap = receiver.requests[1][2] - receiver.requests[0][2]
    second_gap = receiver.requests[2][2] - receiver.requests[1][2]
    assert second_gap > first_gap
    bodies = {body for _, body, _ in receiver.requests}
    event_ids = {headers["x-webhook-id"] for headers, _, _ in receiver.requests}
    assert len(bodies) == 1
    assert len(event_ids) == 1


async def test_delivery_fails_after_timeouts(
    fast_settings: Settings, session_factory: SessionFactory
) -> None:
    settings = fast_settings.model_copy(update={"WEBHOOK_TIMEOUT_S": 0.3})
    receiver = WebhookReceiver([200], delay_s=1.0)
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(settings, session_factory) as context,
    ):
        user, _ = await create_user_with_webhook(
            session_factory, f"{base_url}/hook", generate_secret()
        )
        _, delivery_ids = await record_incoming(session_factory, user)
        await queue_deliveries(context.redis, context.keys, delivery_ids)
        await wait_until(
            lambda: _status_is(session_factory, delivery_ids[0], "failed"), 15
        )

    delivery, attempts = await delivery_state(session_factory, delivery_ids[0])
    assert delivery.attempts == 3
    assert [attempt.error for attempt in attempts] == ["timeout", "timeout", "timeout"]
    assert delivery.completed_at is not None


async def test_delivery_gone_disables_webhook(
    fast_settings: Settings, session_factory: SessionFactory
) -> None:
    receiver = WebhookReceiver([410])
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(fast_settings, session_factory) as context,
    ):
        user, webhook = await create_user_with_webhook(
            session_factory, f"{base_url}/hook", generate_secret()
        )
        started_at = datetime.now(UTC)
        _, delivery_ids = await record_incoming(session_factory, user)
        await queue_deliveries(context.redis, context.keys, delivery_ids)
        await wait_until(
            lambda: _status_is(session_factory, delivery_ids[0], "failed"), 5
        )
        _, later_ids = await record_incoming(session_factory, user, body="second")
    finished_at = datetime.now(UTC)

    assert len(receiver.requests) == 1
    assert later_ids == []
    async with session_factory() as session:
        refreshed = await session.get_one(WebhookConfig, webhook.id)
    assert refreshed.is_active is False
    assert refreshed.disabled_reason == "gone"
    assert refreshed.disabled_at is not None
    assert started_at <= refreshed.disabled_at <= finished_at


async def test_disable_webhook_keeps_first_time(
    session_factory: SessionFactory,
) -> None:
    _, webhook = await create_user_with_webhook(
        session_factory, "http://127.0.0.1:9/hook", generate_secret()
    )
    engine = session_factory.kw["bind"]

    async with repository.pooled_connection(engine) as connection:
        await repository.disable_webhook(connection, webhook.id, DISABLED_GONE)
    first = await _webhook_row(session_factory, webhook.id)
    async with repository.pooled_connection(engine) as connection:
        await repository.disable_webhook(connection, webhook.id, DISABLED_GONE)
    repeated = await _webhook_row(session_factory, webhook.id)
    async with session_factory() as session:
        await session.execute(
            update(WebhookConfig)
            .where(WebhookConfig.id == webhook.id)
            .values(is_active=True, disabled_reason=None, disabled_at=None)
        )
        await session.commit()
    async with repository.pooled_connection(engine) as connection:
        await repository.disable_webhook(connection, webhook.id, DISABLED_GONE)
    after_enabling = await _webhook_row(session_factory, webhook.id)

    assert first.is_active is False
    assert first.disabled_reason == "gone"
    assert first.disabled_at is not None
    assert repeated.disabled_at == first.disabled_at
    assert after_enabling.disabled_reason == "gone"
    assert after_enabling.disabled_at is not None
    assert after_enabling.disabled_at > first.disabled_at


async def _webhook_row(
    session_factory: SessionFactory, webhook_id: uuid.UUID
) -> WebhookConfig:
    async with session_factory() as session:
        return await session.get_one(WebhookConfig, webhook_id)


async def test_delivery_gone_cancels_pending_deliveries(
    fast_settings: Settings, session_factory: SessionFactory
) -> None:
    receiver = WebhookReceiver([410])
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(fast_settings, session_factory) as context,
    ):
        user, _ = await create_user_with_webhook(
            session_factory, f"{base_url}/hook", generate_secret()
        )
        _, gone_ids = await record_incoming(session_factory, user)
        # Pending in Postgres, but never queued, so only the 410 can end it.
        _, waiting_ids = await record_incoming(session_factory, user, body="second")
        await queue_deliveries(context.redis, context.keys, gone_ids)
        await wait_until(lambda: _status_is(session_factory, gone_ids[0], "failed"), 5)

    waiting, attempts = await delivery_state(session_factory, waiting_ids[0])
    assert len(receiver.requests) == 1
    assert waiting.status == "cancelled"
    assert waiting.last_error == "webhook_disabled"
    assert waiting.completed_at is not None
    assert attempts == []


async def test_unsubscribed_event_cancelled_not_posted(
    fast_settings: Settings, session_factory: SessionFactory
) -> None:
    receiver = WebhookReceiver([200])
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(fast_settings, session_factory) as context,
    ):
        user, webhook = await create_user_with_webhook(
            session_factory, f"{base_url}/hook", generate_secret()
        )
        _, delivery_ids = await record_incoming(session_factory, user)
        # The owner removes the event while its delivery waits.
        async with session_factory() as session:
            await session.execute(
                update(WebhookConfig)
                .where(WebhookConfig.id == webhook.id)
                .values(events=["sms_sent"])
            )
            await session.commit()
        await queue_deliveries(context.redis, context.keys, delivery_ids)
        await wait_until(
            lambda: _status_is(session_factory, delivery_ids[0], "cancelled"), 5
        )

    delivery, attempts = await delivery_state(session_factory, delivery_ids[0])
    assert receiver.requests == []
    assert delivery.last_error == "unsubscribed"
    assert attempts == []


async def test_delivery_waits_for_stopped_sender(
    fast_settings: Settings, session_factory: SessionFactory
) -> None:
    receiver = WebhookReceiver([200])
    redis = create_redis(fast_settings)
    keys = RedisKeys(fast_settings.REDIS_KEY_PREFIX)
    async with serve_app(receiver) as base_url:
        user, _ = await create_user_with_webhook(
            session_factory, f"{base_url}/hook", generate_secret()
        )
        _, delivery_ids = await record_incoming(session_factory, user)
        await queue_deliveries(redis, keys, delivery_ids)
        await asyncio.sleep(0.3)
        assert receiver.requests == []

        async with delivery_worker(fast_settings, session_factory):
            await receiver.wait_for(1, timeout_s=5)
    await redis.aclose()

    assert len(receiver.requests) == 1


async def test_sweep_delivers_event_whose_job_was_lost(
    fast_settings: Settings, session_factory: SessionFactory
) -> None:
    receiver = WebhookReceiver([200])
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(fast_settings, session_factory) as context,
    ):
        user, _ = await create_user_with_webhook(
            session_factory, f"{base_url}/hook", generate_secret()
        )
        # Recorded in Postgres, but no job was ever queued, as after a Redis flush.
        _, delivery_ids = await record_incoming(session_factory, user)

        queued = await requeue_due_deliveries(context)
        await receiver.wait_for(1, timeout_s=5)

    assert queued == 1
    assert len(delivery_ids) == 1


async def test_record_event_once_per_message_state(
    session_factory: SessionFactory,
) -> None:
    user, _ = await create_user_with_webhook(
        session_factory, "http://127.0.0.1:9/hook", generate_secret()
    )
    message_id, first = await record_incoming(session_factory, user)

    async with session_factory() as session:
        second = await record_message_event(
            session,
            event=EVENT_SMS_RECEIVED,
            user_id=user.id,
            message_id=message_id,
            from_number="+34600000001",
            to_number=None,
            body="again",
            timestamp=datetime.now(UTC),
            device_id=None,
        )
        await session.commit()

    assert len(first) == 1
    assert second == []


async def test_close_releases_claim_before_post(
    fast_settings: Settings, session_factory: SessionFactory
) -> None:
    receiver = WebhookReceiver([200])
    async with serve_app(receiver) as base_url:
        user, _ = await create_user_with_webhook(
            session_factory, f"{base_url}/hook", generate_secret()
        )
        _, [delivery_id] = await record_incoming(session_factory, user)
        async with delivery_context(fast_settings, session_factory) as context:
            # The claim of a job that arq cancelled before its POST started.
            claimed = await _claim(context, delivery_id, None)
            assert isinstance(claimed, repository.ClaimedDelivery)
            await context.close(wait_s=0)
            job_id = released_job_id(context.keys, delivery_id, 1)
            queued_at = await context.redis.zscore(context.keys.arq_queue, job_id)
        released, _ = await delivery_state(session_factory, delivery_id)

        async with delivery_worker(fast_settings, session_factory):
            await receiver.wait_for(1, timeout_s=5)
            await wait_until(
                lambda: _status_is(session_factory, delivery_id, "succeeded"), 5
            )

    assert released.status == "pending"
    assert released.attempts == 0
    assert released.next_attempt_at is not None
    assert released.next_attempt_at <= datetime.now(UTC)
    assert queued_at is not None
    delivery, attempts = await delivery_state(session_factory, delivery_id)
    assert delivery.attempts == 1
    assert [attempt.status_code for attempt in attempts] == [200]
    assert len(receiver.requests) == 1


async def test_close_keeps_lease_of_posted_attempt(
    fast_settings: Settings, session_factory: SessionFactory
) -> None:
    receiver = WebhookReceiver([200], delay_s=1.0)
    async with serve_app(receiver) as base_url:
        user, _ = await create_user_with_webhook(
            session_factory, f"{base_url}/hook", generate_secret()
        )
        _, [delivery_id] = await record_incoming(session_factory, user)
        async with delivery_context(fast_settings, session_factory) as context:
            attempt = asyncio.create_task(attempt_delivery(context, delivery_id))
            await receiver.wait_for(1, timeout_s=5)
            # Cancelled as arq cancels a job still running at the end of its shutdown
            # wait: the endpoint may already have the event, so the lease must stay.
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)
            await context.close(wait_s=0)
            job_id = released_job_id(context.keys, delivery_id, 1)
            queued_at = await context.redis.zscore(context.keys.arq_queue, job_id)

    delivery, attempts = await delivery_state(session_factory, delivery_id)
    assert attempt.cancelled()
    assert queued_at is None
    assert delivery.status == "pending"
    assert delivery.attempts == 1
    assert attempts == []
    assert delivery.next_attempt_at is not None
    lease_left_s = (delivery.next_attempt_at - datetime.now(UTC)).total_seconds()
    assert lease_left_s > fast_settings.WEBHOOK_TIMEOUT_S
