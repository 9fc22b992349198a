"""Queries of the recovery sweep: messages that are not final and have not changed."""

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, and_, func, literal_column, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common.db import literal_in, sql_literal
from mensajero_common.models import MessageStatus, MessageType, SMSMessage

OPEN_STATUSES = (MessageStatus.PENDING, MessageStatus.ASSIGNED, MessageStatus.SENDING)

Cursor = tuple[datetime, uuid.UUID]


@dataclass(frozen=True)
class StaleMessage:
    id: uuid.UUID
    status: MessageStatus
    device_id: uuid.UUID | None
    updated_at: datetime

    @property
    def cursor(self) -> Cursor:
        return (self.updated_at, self.id)


# Written into the SQL instead of bound, so that the statement matches the predicate of
# ix_smsmessage_updated_at_open on a generic plan too, which is planned without its
# parameters. Bound, they left that plan to scan the whole table and sort every open
# message, on every page.
_IS_OPEN_OUTGOING = and_(
    SMSMessage.type.concat(literal_column("''")) == sql_literal(MessageType.OUTGOING),
    literal_in(SMSMessage.status, OPEN_STATUSES),
)


def stale_messages_statement(
    stale_after_s: float, after: Cursor | None, limit: int
) -> Select[uuid.UUID, MessageStatus, uuid.UUID | None, datetime]:
    """Build the select of a page of list_stale."""
    statement = (
        select(
            SMSMessage.id,
            SMSMessage.status,
            SMSMessage.device_id,
            SMSMessage.updated_at,
        )
        .where(
            _IS_OPEN_OUTGOING,
            SMSMessage.updated_at < func.now() - timedelta(seconds=stale_after_s),
            or_(
                SMSMessage.status != MessageStatus.PENDING.value,
                SMSMessage.next_attempt_at.is_(None),
                SMSMessage.next_attempt_at <= func.now(),
            ),
            or_(SMSMessage.expires_at.is_(None), SMSMessage.expires_at > func.now()),
        )
        .order_by(SMSMessage.updated_at, SMSMessage.id)
        .limit(limit)
    )
    if after is not None:
        statement = statement.where(
            tuple_(SMSMessage.updated_at, SMSMessage.id) > after
        )
    return statement


async def list_stale(
    session: AsyncSession, *, stale_after_s: float, after: Cursor | None, limit: int
) -> list[StaleMessage]:
    """Return up to `limit` open messages unchanged for `stale_after_s` seconds, oldest
    change first.

    Left out: a retry still inside its delay, and expired messages, which the expiry
    check ends.
    """
    statement = stale_messages_statement(stale_after_s, after, limit)
    rows = (await session.execute(statement)).all()
    return [
        StaleMessage(row.id, MessageStatus(row.status), row.device_id, row.updated_at)
        for row in rows
    ]
