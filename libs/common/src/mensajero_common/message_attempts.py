"""Attempts of outgoing messages: starting one, ending one, retrying, expiring,
cancelling, refunding.

Both the device-hub (a `failed` or `expired` report) and the dispatcher (a missed deadline,
an expiry) end attempts, so the rules live here once. Every function runs in the caller's
transaction and never commits; the caller queues the returned webhook deliveries after
its commit.

A retry is a new attempt of the same message. The message goes back to `pending` with
`next_attempt_at` set, and only the failure of the last attempt writes `failed` and
records the `sms_failed` event. Within an attempt the status only moves forward, and
nothing leaves `delivered`, `failed` or `expired`.

Quota policy: a send is charged once, when the API accepts it, and retries never charge
again. A message that ends `failed` or `expired` gets its charge back when no SMS of it
can have gone out: no attempt reached `sent`, and no failure left the outcome unknown.
The refund applies only while the quota still counts the period of the charge.
"""

import functools
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import (
    Table,
    Update,
    any_,
    bindparam,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common.db import driver_connection
from mensajero_common.models import (
    AttemptStatus,
    MessageStatus,
    MessageType,
    SMSMessage,
    SMSMessageAttempt,
)
from mensajero_common.settings import Settings
from mensajero_common.status import predecessors
from mensajero_common.webhook_outbox import record_message_event
from mensajero_common.webhooks import EVENT_SMS_FAILED

# Stored in `smsmessage.error` and sent in the `sms_failed` event.
ERROR_NO_REPORT = "no_report"
ERROR_EXPIRED = "expired"
ERROR_NO_ACK = "no_ack"
ERROR_CANCELLED = "cancelled"

# Statuses of a message that no phone has claimed. A phone claims its attempt with a
# `sending` report, which moves the message to `sending` in the transaction whose `ack`
# lets the phone send.
UNCLAIMED_STATUSES = frozenset({MessageStatus.PENDING, MessageStatus.ASSIGNED})

# Attempt statuses after which the attempt is over.
ENDED_ATTEMPT_STATUSES = frozenset(
    {
        AttemptStatus.DELIVERED,
        AttemptStatus.FAILED,
        AttemptStatus.MOVED,
        AttemptStatus.NO_REPORT,
        AttemptStatus.EXPIRED,
    }
)
_ATTEMPT_ORDER = (
    AttemptStatus.ASSIGNED,
    AttemptStatus.SENDING,
    AttemptStatus.SENT,
    AttemptStatus.DELIVERED,
)


@dataclass(frozen=True)
class LockedMessage:
    """An outgoing message row, locked FOR UPDATE by the caller's transaction."""

    id: uuid.UUID
    user_id: uuid.UUID
    device_id: uuid.UUID | None
    requested_device_id: uuid.UUID | None
    status: MessageStatus
    attempts: int
    to_number: str | None
    from_number: str | None
    body: str
    segments: int
    sent_at: datetime | None
    expires_at: datetime | None
    created_at: datetime

    @property
    def current_attempt(self) -> int:
        """Number of the attempt in progress; 1 for rows written before attempts existed."""
        return max(self.attempts, 1)


@dataclass(frozen=True)
class AttemptEnd:
    """The outcome of ending an attempt, for its message."""

    # `pending` when another attempt follows, else `failed` or `expired`.
    status: MessageStatus
    next_attempt_at: datetime | None
    # Webhook deliveries to queue after the commit.
    delivery_ids: list[uuid.UUID]


_messages = cast(Table, SMSMessage.__table__)
_attempts = cast(Table, SMSMessageAttempt.__table__)

# One statement text whatever the number of ids, because an IN list would make asyncpg
# prepare a new statement for every batch size. Core columns, not ORM attributes, so
# that executing it skips the ORM's per-statement work.
_LOCK_MESSAGES = (
    select(*(_messages.c[item.name] for item in fields(LockedMessage)))
    .where(
        _messages.c.id
        == any_(bindparam("b_message_ids", type_=ARRAY(UUID(as_uuid=True)))),
        _messages.c.type == MessageType.OUTGOING.value,
    )
    .order_by(_messages.c.id)
    .with_for_update()
)


async def lock_message(
    session: AsyncSession, message_id: uuid.UUID
) -> LockedMessage | None:
    """Lock an outgoing message for the rest of the transaction and return it."""
    return (await lock_messages(session, [message_id])).get(message_id)


async def lock_messages(
    session: AsyncSession, message_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, LockedMessage]:
    """Lock outgoing messages for the rest of the transaction; return them by id.

    The rows are locked in id order, so two transactions that lock overlapping sets this
    way wait for each other instead of deadlocking.
    """
    if not message_ids:
        return {}
    result = await session.execute(_LOCK_MESSAGES, {"b_message_ids": list(message_ids)})
    locked = {}
    for row in result.all():
        values = row._asdict()
        values["status"] = MessageStatus(values["status"])
        locked[row.id] = LockedMessage(**values)
    return locked


async def start_attempts(
    session: AsyncSession,
    attempts: list[tuple[uuid.UUID, int, uuid.UUID]],
) -> None:
    """Record the start of each (message id, attempt number, device id)."""
    if not attempts:
        return
    statement = (
        pg_insert(SMSMessageAttempt)
        .values(
            [
                {
                    "message_id": message_id,
                    "attempt_number": attempt_number,
                    "device_id": device_id,
                    "status": AttemptStatus.ASSIGNED.value,
                }
                for message_id, attempt_number, device_id in attempts
            ]
        )
        .on_conflict_do_nothing(index_elements=["message_id", "attempt_number"])
    )
    await session.execute(statement)


def _attempt_may_move(current: AttemptStatus, new: AttemptStatus) -> bool:
    if current in ENDED_ATTEMPT_STATUSES:
        return False
    if new not in _ATTEMPT_ORDER:
        return True
    return _ATTEMPT_ORDER.index(new) > _ATTEMPT_ORDER.index(current)


# For each new status, the statuses of an attempt that may move to it.
_MAY_MOVE_FROM = {
    new: [current.value for current in AttemptStatus if _attempt_may_move(current, new)]
    for new in AttemptStatus
}


async def record_attempt_status(
    session: AsyncSession,
    message: LockedMessage,
    status: AttemptStatus,
    *,
    attempt_number: int | None = None,
    error: str | None = None,
    parts: int | None = None,
) -> None:
    """Move an attempt of `message` (the current one by default) forward to `status`.

    An attempt row that is missing (a message assigned before attempts were recorded) is
    written now. An attempt that has ended keeps its outcome.
    """
    number = attempt_number or message.current_attempt
    parameters: dict[str, object] = {
        "b_message_id": message.id,
        "b_attempt_number": number,
    }
    if error is not None:
        parameters["b_error"] = error
    if parts is not None:
        parameters["b_parts"] = parts
    # One round trip in the usual case: the row exists and may move.
    statement = _move_attempt_statement(status, error is not None, parts is not None)
    if (await session.execute(statement, parameters)).first() is not None:
        return

    existing = await session.execute(
        select(_attempts.c.id).where(
            _attempts.c.message_id == message.id,
            _attempts.c.attempt_number == number,
        )
    )
    if existing.first() is not None:
        return
    values = _attempt_values(status)
    if error is not None:
        values["error"] = error
    if parts is not None:
        values["parts"] = parts
    await session.execute(
        pg_insert(SMSMessageAttempt).values(
            message_id=message.id,
            attempt_number=number,
            device_id=message.device_id,
            **values,
        )
    )


def _attempt_values(status: AttemptStatus) -> dict[str, object]:
    """Return the columns that moving an attempt to `status` sets, besides error and
    parts."""
    values: dict[str, object] = {"status": status.value}
    if status is AttemptStatus.SENDING:
        values["acknowledged_at"] = func.now()
    if status in ENDED_ATTEMPT_STATUSES:
        values["ended_at"] = func.now()
    return values


@functools.cache
def _move_attempt_statement(
    status: AttemptStatus, with_error: bool, with_parts: bool
) -> Update:
    """Build, once per shape, the UPDATE that moves an attempt to `status` if it may."""
    values = _attempt_values(status)
    if with_error:
        values["error"] = bindparam("b_error")
    if with_parts:
        values["parts"] = bindparam("b_parts")
    return (
        update(_attempts)
        .where(
            _attempts.c.message_id == bindparam("b_message_id"),
            _attempts.c.attempt_number == bindparam("b_attempt_number"),
            _attempts.c.status.in_(_MAY_MOVE_FROM[status]),
        )
        .values(**values)
        .returning(_attempts.c.id)
    )


async def count_failed_attempts(session: AsyncSession, message: LockedMessage) -> int:
    """Count the failed attempts of a message.

    Attempts that have no row (made before attempts were recorded) count as failed, so a
    message from then is not tried more often than MESSAGE_MAX_ATTEMPTS.
    """
    statement = select(
        func.count(),
        func.count().filter(SMSMessageAttempt.status == AttemptStatus.FAILED.value),
    ).where(SMSMessageAttempt.message_id == message.id)
    recorded, failed = (await session.execute(statement)).one()
    return int(failed) + max(0, message.current_attempt - int(recorded))


async def fail_attempt(
    session: AsyncSession,
    settings: Settings,
    message: LockedMessage,
    error: str | None,
    *,
    retryable: bool,
    attempt_status: AttemptStatus = AttemptStatus.FAILED,
) -> AttemptEnd:
    """End the current attempt of an in-flight message as failed, then either queue the
    next attempt or end the message `failed`.

    Another attempt follows only when the failure is `retryable`, no SMS of the message
    went out (`sent_at` is unset), and fewer than MESSAGE_MAX_ATTEMPTS attempts failed.
    """
    await record_attempt_status(session, message, attempt_status, error=error)

    nothing_went_out = message.sent_at is None
    if retryable and nothing_went_out:
        failures = await count_failed_attempts(session, message)
        if failures < settings.MESSAGE_MAX_ATTEMPTS:
            next_attempt_at = await _queue_retry(session, settings, message, error)
            if next_attempt_at is not None:
                return AttemptEnd(MessageStatus.PENDING, next_attempt_at, [])

    delivery_ids = await end_failed(
        session,
        settings,
        message,
        error,
        refund=retryable and nothing_went_out,
    )
    return AttemptEnd(MessageStatus.FAILED, None, delivery_ids)


async def _queue_retry(
    session: AsyncSession,
    settings: Settings,
    message: LockedMessage,
    error: str | None,
) -> datetime | None:
    # `device_id` keeps the failed device until the next assignment, so the API still
    # shows which phone tried last.
    statement = (
        update(SMSMessage)
        .where(SMSMessage.id == message.id, SMSMessage.status == message.status.value)
        .values(
            status=MessageStatus.PENDING.value,
            error=error,
            next_attempt_at=func.now()
            + timedelta(seconds=settings.MESSAGE_RETRY_DELAY_S),
        )
        .returning(SMSMessage.next_attempt_at)
    )
    return (await session.execute(statement)).scalar_one_or_none()


def _sender_number(message: LockedMessage) -> str | None:
    """Return the `from` of a message that ends now: the number of the phone that has
    claimed it, or None when no phone has (the message is `pending` or `assigned`)."""
    if message.status in (MessageStatus.PENDING, MessageStatus.ASSIGNED):
        return None
    return message.from_number


async def end_failed(
    session: AsyncSession,
    settings: Settings,
    message: LockedMessage,
    error: str | None,
    *,
    refund: bool,
) -> list[uuid.UUID]:
    """Move a message that is not final to `failed`, record `sms_failed`, and give its
    quota charge back when `refund` is set. Returns the deliveries to queue."""
    from_number = _sender_number(message)
    statement = (
        update(SMSMessage)
        .where(
            SMSMessage.id == message.id,
            SMSMessage.status.in_(
                [status.value for status in predecessors(MessageStatus.FAILED)]
            ),
        )
        .values(
            status=MessageStatus.FAILED.value,
            failed_at=func.now(),
            error=error,
            next_attempt_at=None,
            from_number=from_number,
        )
        .returning(SMSMessage.failed_at)
    )
    failed_at = (await session.execute(statement)).scalar_one_or_none()
    if failed_at is None:
        return []
    if refund:
        await refund_quota(session, message.id, message.user_id)
    return await record_message_event(
        session,
        event=EVENT_SMS_FAILED,
        user_id=message.user_id,
        message_id=message.id,
        from_number=from_number,
        to_number=message.to_number,
        body=message.body,
        timestamp=failed_at,
        device_id=message.device_id,
        status=MessageStatus.FAILED.value,
        error=error,
        segments=message.segments,
    )


async def expire_message(
    session: AsyncSession, settings: Settings, message: LockedMessage
) -> AttemptEnd | None:
    """Move a message that no phone has sent to `expired`, record `sms_failed` with the
    status `expired`, and give its quota charge back.

    Only `pending`, `assigned` and `sending` messages with no SMS sent can expire; for
    any other, nothing changes and None is returned.
    """
    from_number = _sender_number(message)
    statement = (
        update(SMSMessage)
        .where(
            SMSMessage.id == message.id,
            SMSMessage.status.in_(
                [
                    MessageStatus.PENDING.value,
                    MessageStatus.ASSIGNED.value,
                    MessageStatus.SENDING.value,
                ]
            ),
            SMSMessage.sent_at.is_(None),
        )
        .values(
            status=MessageStatus.EXPIRED.value,
            failed_at=func.now(),
            error=ERROR_EXPIRED,
            next_attempt_at=None,
            from_number=from_number,
        )
        .returning(SMSMessage.failed_at)
    )
    expired_at = (await session.execute(statement)).scalar_one_or_none()
    if expired_at is None:
        return None
    if message.status is not MessageStatus.PENDING:
        await record_attempt_status(
            session, message, AttemptStatus.EXPIRED, error=ERROR_EXPIRED
        )
    await refund_quota(session, message.id, message.user_id)
    # There is no event of its own for expiry: subscribers of `sms_failed` learn that
    # the message will never be sent, from the `status` field.
    delivery_ids = await record_message_event(
        session,
        event=EVENT_SMS_FAILED,
        user_id=message.user_id,
        message_id=message.id,
        from_number=from_number,
        to_number=message.to_number,
        body=message.body,
        timestamp=expired_at,
        device_id=message.device_id,
        status=MessageStatus.EXPIRED.value,
        error=ERROR_EXPIRED,
        segments=message.segments,
    )
    return AttemptEnd(MessageStatus.EXPIRED, None, delivery_ids)


async def cancel_message(
    session: AsyncSession, settings: Settings, message: LockedMessage
) -> AttemptEnd | None:
    """End a message that no phone has claimed `failed` with the error `cancelled`,
    record `sms_failed`, and give its quota charge back.

    An `assigned` message's attempt ends `failed` too, so the `ack` of its phone's later
    claim names `failed` and the phone does not send. Only `pending` and `assigned`
    messages can be cancelled; for any other, nothing changes and None is returned.
    """
    if message.status not in UNCLAIMED_STATUSES:
        return None
    if message.status is MessageStatus.ASSIGNED:
        await record_attempt_status(
            session, message, AttemptStatus.FAILED, error=ERROR_CANCELLED
        )
    # A retry follows only a failure that sent nothing, so no SMS of a message that no
    # phone has claimed can have gone out.
    delivery_ids = await end_failed(
        session, settings, message, ERROR_CANCELLED, refund=True
    )
    return AttemptEnd(MessageStatus.FAILED, None, delivery_ids)


# Gives the charge back once per message, and only while the quota row still counts the
# period of the charge: a message created before the row's latest reset was charged to a
# count that the reset already cleared. The first check reads the statement's snapshot,
# which misses a reset that commits while the final UPDATE waits for the row's lock. So the
# final UPDATE checks the period again: Postgres evaluates its WHERE again on the row as
# that reset left it.
_REFUND = text(
    """
    WITH refunded AS (
        UPDATE smsmessage SET quota_refunded_at = now()
        WHERE id = :message_id
          AND quota_refunded_at IS NULL
          AND EXISTS (
              SELECT 1 FROM userquota
              WHERE user_id = :user_id
                AND smsmessage.created_at
                    >= (userquota.last_reset_date::timestamp AT TIME ZONE 'UTC')
          )
        RETURNING created_at
    )
    UPDATE userquota
    SET sms_sent_this_month = GREATEST(sms_sent_this_month - 1, 0), updated_at = now()
    WHERE user_id = :user_id
      AND (SELECT created_at FROM refunded)
          >= (userquota.last_reset_date::timestamp AT TIME ZONE 'UTC')
    RETURNING user_id
    """
)


async def refund_quota(
    session: AsyncSession, message_id: uuid.UUID, user_id: uuid.UUID
) -> bool:
    """Give back the quota charge of a message; return whether it was given back now."""
    result = await session.execute(
        _REFUND, {"message_id": message_id, "user_id": user_id}
    )
    return result.first() is not None


# Sent on the session's asyncpg connection, inside its transaction: through SQLAlchemy,
# binding the arrays cost more CPU than the statement.
_MOVE_ATTEMPTS = """
    UPDATE smsmessageattempt SET
        status = moves.status,
        acknowledged_at = CASE WHEN moves.status = $4 THEN now()
                               ELSE smsmessageattempt.acknowledged_at END,
        ended_at = CASE WHEN moves.status = ANY($5::text[]) THEN now()
                        ELSE smsmessageattempt.ended_at END
    FROM unnest($1::uuid[], $2::integer[], $3::text[])
        AS moves(message_id, attempt_number, status)
    WHERE smsmessageattempt.message_id = moves.message_id
      AND smsmessageattempt.attempt_number = moves.attempt_number
      -- Forward only along the order; NULL (an ended status) never moves.
      AND array_position($6::text[], smsmessageattempt.status)
          < array_position($6::text[], moves.status)
    RETURNING smsmessageattempt.message_id
"""


async def record_attempt_moves(
    session: AsyncSession, moves: Sequence[tuple[LockedMessage, AttemptStatus]]
) -> None:
    """Move the current attempt of each message forward to its status, like
    record_attempt_status, in one statement for the usual case.

    Only `sending`, `sent` and `delivered` are accepted. The attempts that did not move
    (a missing row, or one that has moved past or ended) go through
    record_attempt_status one by one.
    """
    if not moves:
        return
    for _, status in moves:
        if status not in _ATTEMPT_ORDER[1:]:
            raise ValueError(f"record_attempt_moves cannot move an attempt to {status}")
    connection = await driver_connection(session)
    rows = await connection.fetch(
        _MOVE_ATTEMPTS,
        [message.id for message, _ in moves],
        [message.current_attempt for message, _ in moves],
        [status.value for _, status in moves],
        AttemptStatus.SENDING.value,
        [status.value for status in ENDED_ATTEMPT_STATUSES],
        [status.value for status in _ATTEMPT_ORDER],
    )
    moved = {row[0] for row in rows}
    for message, status in moves:
        if message.id not in moved:
            await record_attempt_status(session, message, status)
