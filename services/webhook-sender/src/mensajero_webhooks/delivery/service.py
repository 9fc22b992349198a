"""One delivery attempt: claim it, POST it, record it, and schedule the retry."""

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import structlog
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.db import session_scope
from mensajero_common.keys import RedisKeys
from mensajero_common.metrics import WEBHOOK_ATTEMPTS
from mensajero_common.models import WebhookDeliveryStatus
from mensajero_common.settings import Settings
from mensajero_common.webhook_outbox import DELIVERY_JOB, delivery_job_id
from mensajero_common.webhooks import AttemptResult, post_event
from mensajero_webhooks.delivery import repository

logger = structlog.get_logger(__name__)

# Extra time an attempt's lease lasts beyond the HTTP timeout, for the database writes.
LEASE_MARGIN_S = 30.0
HTTP_GONE = 410


@dataclass
class DeliveryContext:
    settings: Settings
    keys: RedisKeys
    session_factory: async_sessionmaker[AsyncSession]
    redis: ArqRedis
    http: httpx.AsyncClient


def retry_delay_s(settings: Settings, attempt_number: int) -> float:
    """Return the wait after failed attempt `attempt_number`: base × 2^(n-1), ±20 % jitter."""
    delay = settings.WEBHOOK_RETRY_BASE_DELAY_S * 2 ** (attempt_number - 1)
    return delay * random.uniform(0.8, 1.2)


def _outcome(
    settings: Settings, attempt_number: int, result: AttemptResult
) -> tuple[str, datetime | None]:
    """Decide the delivery's status after an attempt, and when to retry if it does."""
    if result.succeeded:
        return WebhookDeliveryStatus.SUCCEEDED, None
    if result.status_code == HTTP_GONE or result.error in (
        "private_address",
        "https_required",
    ):
        return WebhookDeliveryStatus.FAILED, None
    if attempt_number >= settings.WEBHOOK_MAX_ATTEMPTS:
        return WebhookDeliveryStatus.FAILED, None
    next_retry_at = datetime.now(UTC) + timedelta(
        seconds=retry_delay_s(settings, attempt_number)
    )
    return WebhookDeliveryStatus.PENDING, next_retry_at


async def attempt_delivery(context: DeliveryContext, delivery_id: uuid.UUID) -> str:
    """Run the next attempt of a delivery if it is due; return what happened to it."""
    settings = context.settings
    async with session_scope(context.session_factory) as session:
        claimed = await repository.claim(
            session, delivery_id, settings.WEBHOOK_TIMEOUT_S + LEASE_MARGIN_S
        )
    if claimed is None:
        return "not_due"

    log = logger.bind(
        delivery_id=str(delivery_id),
        webhook_id=str(claimed.webhook_id),
        attempt=claimed.attempt_number,
    )
    if not claimed.webhook_active:
        async with session_scope(context.session_factory) as session:
            await repository.cancel(session, delivery_id, "webhook_disabled")
        log.info("delivery cancelled because the webhook is disabled")
        WEBHOOK_ATTEMPTS.labels("cancelled").inc()
        return WebhookDeliveryStatus.CANCELLED

    result = await post_event(
        context.http,
        url=claimed.url,
        secret=claimed.secret,
        event_id=str(claimed.event_id),
        body=claimed.body.encode(),
        timeout_s=settings.WEBHOOK_TIMEOUT_S,
        require_https=settings.is_production,
        allow_private=settings.webhook_private_urls_allowed,
    )
    status, next_retry_at = _outcome(settings, claimed.attempt_number, result)
    WEBHOOK_ATTEMPTS.labels("retry" if next_retry_at is not None else str(status)).inc()

    async with session_scope(context.session_factory) as session:
        await repository.record_attempt(
            session, claimed, result, status=status, next_retry_at=next_retry_at
        )
        if status == WebhookDeliveryStatus.SUCCEEDED and claimed.message_id is not None:
            await repository.mark_message_notified(session, claimed.message_id)
        if result.status_code == HTTP_GONE:
            await repository.disable_webhook(session, claimed.webhook_id)

    if result.status_code == HTTP_GONE:
        log.info("webhook disabled because its endpoint responded with 410 Gone")
    if next_retry_at is not None:
        await context.redis.enqueue_job(
            DELIVERY_JOB,
            str(delivery_id),
            _job_id=delivery_job_id(
                context.keys, delivery_id, claimed.attempt_number + 1
            ),
            _queue_name=context.keys.arq_queue,
            _defer_until=next_retry_at,
        )
        log.info(
            "delivery attempt failed, retry scheduled",
            status_code=result.status_code,
            error=result.error,
            next_retry_at=next_retry_at.isoformat(),
        )
    elif status == WebhookDeliveryStatus.FAILED:
        log.warning(
            "delivery failed", status_code=result.status_code, error=result.error
        )
    else:
        log.debug(
            "delivery succeeded",
            status_code=result.status_code,
            duration_ms=result.duration_ms,
        )
    return status


async def requeue_due_deliveries(context: DeliveryContext, limit: int = 500) -> int:
    """Queue a job for every due pending delivery, whatever happened to its first job.

    Job ids name the delivery and its next attempt, so a delivery whose job is still queued
    is not queued twice, and the lease in `claim` keeps a duplicate from running.
    """
    async with session_scope(context.session_factory) as session:
        due = await repository.due_delivery_ids(session, limit)
        attempts = await repository.attempt_counts(session, due)
    for delivery_id in due:
        await context.redis.enqueue_job(
            DELIVERY_JOB,
            str(delivery_id),
            _job_id=delivery_job_id(
                context.keys, delivery_id, attempts.get(delivery_id, 0) + 1
            ),
            _queue_name=context.keys.arq_queue,
        )
    if due:
        logger.info("due deliveries queued by the sweep", count=len(due))
    return len(due)
