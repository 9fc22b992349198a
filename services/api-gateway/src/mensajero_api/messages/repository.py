"""Queries on the `smsmessage` table, always scoped to the owning user."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, select, union_all
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.pagination import Cursor, check_cursor_origin, keyset_walk
from mensajero_common import jsonutil
from mensajero_common.db import driver_connection, sql_literal
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


# Charges one SMS to the user's quota and inserts the message, in one statement and
# round trip: the UPDATE is the conditional charge of quotas.repository.charge_sms, and
# the INSERT only happens for the row it returns. A quota row last reset before
# $period_start is charged from 0 and gets $today as its reset date.
_INSERT_CHARGED_SQL = """
WITH charged AS (
    UPDATE userquota
    SET sms_sent_this_month = CASE
            WHEN last_reset_date < $13 THEN 0 ELSE sms_sent_this_month
        END + 1,
        last_reset_date = CASE
            WHEN last_reset_date < $13 THEN $14 ELSE last_reset_date
        END,
        updated_at = now()
    WHERE user_id = $2
      AND CASE WHEN last_reset_date < $13 THEN 0 ELSE sms_sent_this_month END + 1
          <= (SELECT max_sms_per_month FROM userplan WHERE userplan.id = userquota.plan_id)
    RETURNING user_id
)
INSERT INTO smsmessage (
    id, user_id, type, status, to_number, body, segments, encoding, device_id,
    requested_device_id, expires_at, idempotency_key, meta
)
SELECT $1, user_id, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $15::text::jsonb
FROM charged
ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING created_at
"""


async def insert_charged(
    session: AsyncSession, values: dict[str, Any], period_start: date, today: date
) -> datetime | None:
    """Insert an outgoing message and charge it to the quota; return its `created_at`,
    or None when it did neither.

    None means that the monthly quota has no room left (nothing changed), or that the
    message's idempotency key is taken (the charge did happen, so the caller must roll
    the transaction back). The statement runs on asyncpg directly: it is the one of every
    single send, and through SQLAlchemy's ORM the same work took several times the CPU.
    Without an idempotency key it needs no transaction around it: one statement is
    atomic, and it commits at once if the session has not begun one.
    """
    connection = await driver_connection(
        session, transaction=values["idempotency_key"] is not None
    )
    created_at: datetime | None = await connection.fetchval(
        _INSERT_CHARGED_SQL,
        values["id"],
        values["user_id"],
        str(values["type"]),
        str(values["status"]),
        values["to_number"],
        values["body"],
        values["segments"],
        values["encoding"],
        values["device_id"],
        values["requested_device_id"],
        values["expires_at"],
        values["idempotency_key"],
        period_start,
        today,
        jsonutil.dumps_str(values["meta"]),
    )
    return created_at


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


def _filter_branches(filters: MessageFilters) -> list[list[ColumnElement[bool]]]:
    """Return the conditions of each branch of the listing: one per status and number
    column asked for, which never match the same row.

    Each branch is read in (created_at, id) order, along the index of its status or
    number where migration 0017 made one, and stops at the page's limit. One condition
    `status IN (…)` or `to_number = … OR from_number = …` has no such index, so Postgres
    would gather every match, or walk the user's history.
    """
    # A status repeated in the query would make two identical branches, so two copies
    # of each of its messages.
    statuses: list[ColumnElement[bool] | None] = [
        SMSMessage.status == sql_literal(status)
        for status in dict.fromkeys(filters.statuses)
    ] or [None]
    numbers: list[ColumnElement[bool] | None] = [None]
    if filters.phone is not None:
        numbers = [
            SMSMessage.to_number == filters.phone,
            and_(
                SMSMessage.from_number == filters.phone,
                SMSMessage.to_number.is_distinct_from(filters.phone),
            ),
        ]
    return [
        [test for test in (status, number) if test is not None]
        for status in statuses
        for number in numbers
    ]


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
    owner = SMSMessage.user_id == user_id
    if filters.type is not None:
        # An old cursor from the listing of every message may name a row of the other
        # type, which this listing never returned.
        owner = and_(owner, SMSMessage.type == filters.type)
    await check_cursor_origin(
        session, after, SMSMessage.created_at, SMSMessage.id, owner
    )
    statement = listing_statement(
        user_id, filters, after=after, descending=descending, limit=limit
    )
    return (await session.scalars(statement)).all()


def listing_statement(
    user_id: uuid.UUID,
    filters: MessageFilters,
    *,
    after: Cursor | None,
    descending: bool,
    limit: int,
) -> Select[SMSMessage]:
    """Build the statement of list_messages."""
    common = [SMSMessage.user_id == user_id]
    if filters.type is not None:
        common.append(SMSMessage.type == sql_literal(filters.type))
    if filters.device_id is not None:
        common.append(SMSMessage.device_id == filters.device_id)
    if filters.created_from is not None:
        common.append(SMSMessage.created_at >= filters.created_from)
    if filters.created_before is not None:
        common.append(SMSMessage.created_at < filters.created_before)

    branches = _filter_branches(filters)
    if len(branches) == 1:
        statement = select(SMSMessage).where(*common, *branches[0])
        return keyset_walk(
            statement,
            SMSMessage.created_at,
            SMSMessage.id,
            after,
            descending=descending,
        ).limit(limit)

    pages = [
        keyset_walk(
            select(SMSMessage.id).where(*common, *tests),
            SMSMessage.created_at,
            SMSMessage.id,
            after,
            descending=descending,
        ).limit(limit)
        for tests in branches
    ]
    page = union_all(*pages).subquery()
    statement = select(SMSMessage).join(page, SMSMessage.id == page.c.id)
    return keyset_walk(
        statement, SMSMessage.created_at, SMSMessage.id, None, descending=descending
    ).limit(limit)
