"""Queries on webhooks and their delivery log, always scoped to the owning user."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.pagination import Cursor, check_cursor_origin, keyset_walk
from mensajero_common.db import delete_owned_row
from mensajero_common.models import (
    WebhookAttempt,
    WebhookConfig,
    WebhookDelivery,
    WebhookEvent,
)


async def get_webhook(
    session: AsyncSession,
    user_id: uuid.UUID,
    webhook_id: uuid.UUID,
    *,
    for_update: bool = False,
) -> WebhookConfig | None:
    """Find the user's webhook; with `for_update`, lock its row (FOR NO KEY UPDATE)
    until the transaction ends.

    The lock makes a concurrent delete of the webhook wait. When the delete commits
    first, the locked read returns None instead of a row that the update would miss.
    """
    statement = select(WebhookConfig).where(
        WebhookConfig.id == webhook_id, WebhookConfig.user_id == user_id
    )
    if for_update:
        statement = statement.with_for_update(key_share=True).execution_options(
            populate_existing=True
        )
    return (await session.scalars(statement)).one_or_none()


@dataclass(frozen=True)
class WebhookFilters:
    is_active: bool | None = None
    # A webhook matches when its `events` contains this one.
    event: str | None = None


async def list_webhooks(
    session: AsyncSession,
    user_id: uuid.UUID,
    filters: WebhookFilters,
    *,
    after: Cursor | None,
    descending: bool,
    limit: int,
) -> Sequence[WebhookConfig]:
    """Return up to `limit` webhooks in (created_at, id) order, starting after `after`.

    The user_id index is enough here: a user has at most 20 webhooks
    (MAX_WEBHOOKS_PER_USER), so Postgres sorts at most 20 rows for a page.
    """
    await check_cursor_origin(
        session,
        after,
        WebhookConfig.created_at,
        WebhookConfig.id,
        WebhookConfig.user_id == user_id,
    )
    statement = select(WebhookConfig).where(WebhookConfig.user_id == user_id)
    if filters.is_active is not None:
        statement = statement.where(WebhookConfig.is_active.is_(filters.is_active))
    if filters.event is not None:
        statement = statement.where(WebhookConfig.events.contains([filters.event]))

    statement = keyset_walk(
        statement,
        WebhookConfig.created_at,
        WebhookConfig.id,
        after,
        descending=descending,
    )
    return (await session.scalars(statement.limit(limit))).all()


async def count_webhooks(session: AsyncSession, user_id: uuid.UUID) -> int:
    statement = select(func.count()).where(WebhookConfig.user_id == user_id)
    return int((await session.execute(statement)).scalar_one())


async def delete_webhook(
    session: AsyncSession, user_id: uuid.UUID, webhook_id: uuid.UUID
) -> bool:
    """Delete the webhook with its deliveries and their attempts; tell whether it
    existed."""
    return await delete_owned_row(session, WebhookConfig, webhook_id, user_id)


async def list_deliveries(
    session: AsyncSession,
    webhook_id: uuid.UUID,
    *,
    limit: int,
    before: Cursor | None,
) -> list[tuple[WebhookDelivery, WebhookEvent]]:
    """Return a page of the webhook's deliveries, newest first, with their events."""
    await check_cursor_origin(
        session,
        before,
        WebhookDelivery.created_at,
        WebhookDelivery.id,
        WebhookDelivery.webhook_id == webhook_id,
    )
    statement = keyset_walk(
        select(WebhookDelivery, WebhookEvent)
        .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
        .where(WebhookDelivery.webhook_id == webhook_id)
        .limit(limit),
        WebhookDelivery.created_at,
        WebhookDelivery.id,
        before,
        descending=True,
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
