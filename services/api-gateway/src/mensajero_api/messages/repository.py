"""Queries on the `smsmessage` table, always scoped to the owning user."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.messages.cursor import Cursor
from mensajero_common.models import MessageStatus, MessageType, SMSMessage


@dataclass(frozen=True)
class MessageFilters:
    statuses: Sequence[MessageStatus] = ()
    type: MessageType | None = None
    device_id: uuid.UUID | None = None
    # E.164; matches the recipient or the sender.
    phone: str | None = None
    created_from: datetime | None = None
    # Exclusive upper bound.
    created_before: datetime | None = None


async def insert_outgoing(
    session: AsyncSession, values: dict[str, Any]
) -> SMSMessage | None:
    """Insert an outgoing message; return None if its idempotency key is taken.

    When a concurrent transaction has inserted the same key and not yet committed,
    Postgres makes this INSERT wait for it, so two requests with one key never both
    create a message.
    """
    statement = (
        insert(SMSMessage)
        .values(**values)
        .on_conflict_do_nothing(
            index_elements=[SMSMessage.user_id, SMSMessage.idempotency_key],
            index_where=SMSMessage.idempotency_key.is_not(None),
        )
        .returning(SMSMessage)
    )
    return (await session.scalars(statement)).one_or_none()


async def get_message(
    session: AsyncSession, user_id: uuid.UUID, message_id: uuid.UUID
) -> SMSMessage | None:
    statement = select(SMSMessage).where(
        SMSMessage.id == message_id, SMSMessage.user_id == user_id
    )
    return (await session.scalars(statement)).one_or_none()


async def get_message_by_idempotency_key(
    session: AsyncSession, user_id: uuid.UUID, idempotency_key: str
) -> SMSMessage | None:
    statement = select(SMSMessage).where(
        SMSMessage.user_id == user_id, SMSMessage.idempotency_key == idempotency_key
    )
    return (await session.scalars(statement)).one_or_none()


async def list_messages(
    session: AsyncSession,
    user_id: uuid.UUID,
    filters: MessageFilters,
    *,
    after: Cursor | None,
    descending: bool,
    limit: int,
) -> Sequence[SMSMessage]:
    """Return up to `limit` messages in (created_at, id) order, starting after `after`."""
    statement = select(SMSMessage).where(SMSMessage.user_id == user_id)
    if filters.statuses:
        statement = statement.where(SMSMessage.status.in_(filters.statuses))
    if filters.type is not None:
        statement = statement.where(SMSMessage.type == filters.type)
    if filters.device_id is not None:
        statement = statement.where(SMSMessage.device_id == filters.device_id)
    if filters.phone is not None:
        statement = statement.where(
            or_(
                SMSMessage.to_number == filters.phone,
                SMSMessage.from_number == filters.phone,
            )
        )
    if filters.created_from is not None:
        statement = statement.where(SMSMessage.created_at >= filters.created_from)
    if filters.created_before is not None:
        statement = statement.where(SMSMessage.created_at < filters.created_before)

    # A row comparison, so Postgres walks the (user_id, created_at, id) index.
    position = tuple_(SMSMessage.created_at, SMSMessage.id)
    if after is not None:
        boundary = tuple_(after.created_at, after.message_id)
        statement = statement.where(
            position < boundary if descending else position > boundary
        )
    if descending:
        statement = statement.order_by(
            SMSMessage.created_at.desc(), SMSMessage.id.desc()
        )
    else:
        statement = statement.order_by(SMSMessage.created_at.asc(), SMSMessage.id.asc())
    return (await session.scalars(statement.limit(limit))).all()
