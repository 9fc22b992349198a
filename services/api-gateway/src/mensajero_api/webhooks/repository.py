"""Queries on webhooks and their delivery log, always scoped to the owning user."""

import uuid
from collections.abc import Sequence

from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.pagination import Cursor
from mensajero_common.models import (
    WebhookAttempt,
    WebhookConfig,
    WebhookDelivery,
    WebhookEvent,
)


async def get_webhook(
    session: AsyncSession, user_id: uuid.UUID, webhook_id: uuid.UUID
) -> WebhookConfig | None:
    statement = select(WebhookConfig).where(
        WebhookConfig.id == webhook_id, WebhookConfig.user_id == user_id
    )
    return (await session.scalars(statement)).one_or_none()


async def list_webhooks(
    session: AsyncSession, user_id: uuid.UUID
) -> Sequence[WebhookConfig]:
    statement = (
        select(WebhookConfig)
        .where(WebhookConfig.user_id == user_id)
        .order_by(WebhookConfig.created_at, WebhookConfig.id)
    )
    return (await session.scalars(statement)).all()


async def count_webhooks(session: AsyncSession, user_id: uuid.UUID) -> int:
    statement = select(func.count()).where(WebhookConfig.user_id == user_id)
    return int((await session.execute(statement)).scalar_one())


async def delete_webhook(
    session: AsyncSession, user_id: uuid.UUID, webhook_id: uuid.UUID
) -> bool:
    statement = (
        delete(WebhookConfig)
        .where(WebhookConfig.id == webhook_id, WebhookConfig.user_id == user_id)
        .returning(WebhookConfig.id)
    )
    return (await session.execute(statement)).first() is not None


async def list_deliveries(
    session: AsyncSession,
    webhook_id: uuid.UUID,
    *,
    limit: int,
    before: Cursor | None,
) -> list[tuple[WebhookDelivery, WebhookEvent]]:
    """Return a page of the webhook's deliveries, newest first, with their events."""
    statement = (
        select(WebhookDelivery, WebhookEvent)
        .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
        .where(WebhookDelivery.webhook_id == webhook_id)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
        .limit(limit)
    )
    if before is not None:
        statement = statement.where(
            tuple_(WebhookDelivery.created_at, WebhookDelivery.id)
            < tuple_(before.created_at, before.row_id)
        )
    return [(row[0], row[1]) for row in (await session.execute(statement)).all()]


async def attempts_of(
    session: AsyncSession, delivery_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[WebhookAttempt]]:
    if not delivery_ids:
        return {}
    statement = (
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id.in_(delivery_ids))
        .order_by(WebhookAttempt.delivery_id, WebhookAttempt.attempt_number)
    )
    attempts: dict[uuid.UUID, list[WebhookAttempt]] = {}
    for attempt in (await session.scalars(statement)).all():
        attempts.setdefault(attempt.delivery_id, []).append(attempt)
    return attempts
