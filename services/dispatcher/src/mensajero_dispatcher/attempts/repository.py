"""Queries that find attempts past a deadline and messages past their expiry.

Each one locks the rows it returns with FOR UPDATE SKIP LOCKED, so replicas running the
same check at once split the work, and a row that a report is changing is left alone.

The statuses that these checks look for are written into the SQL instead of bound, so
that they match the predicates of the partial indexes of open messages on a generic plan
too. Postgres plans that one without the parameters, and may cache it after five runs.
Bound, such a plan read the status index, or every pending message, and estimated its
rows as a share of the whole table. On a table of 3 million messages, that estimate made
Postgres compile the check of unacknowledged tasks with JIT on every run.
"""

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import (
    ColumnElement,
    Select,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common.db import literal_in
from mensajero_common.models import (
    DeviceStatus,
    MessageStatus,
    MessageType,
    SMSDevice,
    SMSMessage,
)


@dataclass(frozen=True)
class StalledTask:
    """A message whose task sits on a device, with the attempt that task belongs to."""

    message_id: uuid.UUID
    device_id: uuid.UUID | None
    attempt: int


def _not_expired() -> ColumnElement[bool]:
    return or_(SMSMessage.expires_at.is_(None), SMSMessage.expires_at > func.now())


# The select of the id, device and attempts of stalled messages.
StalledSelect = Select[uuid.UUID, uuid.UUID | None, int]


async def _lock_stalled(
    session: AsyncSession, statement: StalledSelect
) -> list[StalledTask]:
    rows = (await session.execute(statement)).all()
    return [StalledTask(row.id, row.device_id, max(row.attempts, 1)) for row in rows]


def _status_in(*statuses: MessageStatus) -> ColumnElement[bool]:
    """Test the status against `statuses` written as SQL literals (see the module's
    docstring)."""
    return literal_in(SMSMessage.status, statuses)


async def lock_unacknowledged(
    session: AsyncSession,
    *,
    ack_timeout_s: float,
    silent_after_s: float,
    stuck_after_s: float,
    user_id: uuid.UUID | None,
    limit: int,
) -> list[StalledTask]:
    """Lock `assigned` messages that no phone acknowledged and that may move.

    A message may move when the sender asked for no device, another device of the user
    is online, and either its device is gone (offline, disabled, deleted, or without a
    heartbeat for `silent_after_s`) and `ack_timeout_s` has passed, or `stuck_after_s`
    has passed whatever its device's state. A device that is alive but slow keeps its
    tasks until then, because moving them would only add work to a busy system.
    """
    statement = unacknowledged_statement(
        ack_timeout_s=ack_timeout_s,
        silent_after_s=silent_after_s,
        stuck_after_s=stuck_after_s,
        user_id=user_id,
        limit=limit,
    )
    return await _lock_stalled(session, statement)


def unacknowledged_statement(
    *,
    ack_timeout_s: float,
    silent_after_s: float,
    stuck_after_s: float,
    user_id: uuid.UUID | None,
    limit: int,
) -> StalledSelect:
    """Build the statement of lock_unacknowledged."""
    another_device_online = exists().where(
        SMSDevice.user_id == SMSMessage.user_id,
        SMSDevice.id != SMSMessage.device_id,
        SMSDevice.status == DeviceStatus.ONLINE.value,
        SMSDevice.is_active.is_(True),
    )
    device_alive = exists().where(
        SMSDevice.id == SMSMessage.device_id,
        SMSDevice.status == DeviceStatus.ONLINE.value,
        SMSDevice.is_active.is_(True),
        SMSDevice.last_heartbeat >= func.now() - timedelta(seconds=silent_after_s),
    )
    waited_s = func.now() - SMSMessage.assigned_at
    statement = (
        select(SMSMessage.id, SMSMessage.device_id, SMSMessage.attempts)
        .where(
            SMSMessage.type == MessageType.OUTGOING.value,
            _status_in(MessageStatus.ASSIGNED),
            SMSMessage.requested_device_id.is_(None),
            waited_s > timedelta(seconds=ack_timeout_s),
            or_(~device_alive, waited_s > timedelta(seconds=stuck_after_s)),
            _not_expired(),
            another_device_online,
        )
        .order_by(SMSMessage.assigned_at, SMSMessage.id)
        .limit(limit)
        .with_for_update(of=SMSMessage, skip_locked=True)
    )
    if user_id is not None:
        statement = statement.where(SMSMessage.user_id == user_id)
    return statement


async def release_to_pending(session: AsyncSession, message_id: uuid.UUID) -> bool:
    """Put an `assigned` message back to `pending` for its next attempt, due at once."""
    statement = (
        update(SMSMessage)
        .where(
            SMSMessage.id == message_id,
            SMSMessage.status == MessageStatus.ASSIGNED.value,
        )
        .values(status=MessageStatus.PENDING.value, next_attempt_at=None)
        .returning(SMSMessage.id)
    )
    return (await session.execute(statement)).scalar_one_or_none() is not None


async def lock_unreported(
    session: AsyncSession, *, report_timeout_s: float, limit: int
) -> list[StalledTask]:
    """Lock `sending` messages acknowledged more than `report_timeout_s` seconds ago."""
    return await _lock_stalled(session, unreported_statement(report_timeout_s, limit))


def unreported_statement(report_timeout_s: float, limit: int) -> StalledSelect:
    """Build the statement of lock_unreported."""
    return (
        select(SMSMessage.id, SMSMessage.device_id, SMSMessage.attempts)
        .where(
            SMSMessage.type == MessageType.OUTGOING.value,
            _status_in(MessageStatus.SENDING),
            SMSMessage.sending_at < func.now() - timedelta(seconds=report_timeout_s),
        )
        .order_by(SMSMessage.sending_at, SMSMessage.id)
        .limit(limit)
        .with_for_update(of=SMSMessage, skip_locked=True)
    )


async def lock_deleted_device_tasks(
    session: AsyncSession, *, limit: int
) -> list[StalledTask]:
    """Lock `assigned` and `sending` messages whose device was deleted.

    Deleting a device sets `device_id` to NULL on its messages (ON DELETE SET NULL), and
    an assignment always sets it, so an in-flight message without a device lost its own.
    """
    return await _lock_stalled(session, deleted_device_tasks_statement(limit))


def deleted_device_tasks_statement(limit: int) -> StalledSelect:
    """Build the statement of lock_deleted_device_tasks."""
    return (
        select(SMSMessage.id, SMSMessage.device_id, SMSMessage.attempts)
        .where(
            SMSMessage.type == MessageType.OUTGOING.value,
            _status_in(MessageStatus.ASSIGNED, MessageStatus.SENDING),
            SMSMessage.device_id.is_(None),
        )
        .order_by(SMSMessage.id)
        .limit(limit)
        .with_for_update(of=SMSMessage, skip_locked=True)
    )


async def lock_expired(session: AsyncSession, *, limit: int) -> list[StalledTask]:
    """Lock `pending` and `assigned` messages whose `expires_at` has passed.

    A `sending` message is left to finish: its phone has the SMS in hand already.
    """
    return await _lock_stalled(session, expired_statement(limit))


def expired_statement(limit: int) -> StalledSelect:
    """Build the statement of lock_expired."""
    return (
        select(SMSMessage.id, SMSMessage.device_id, SMSMessage.attempts)
        .where(
            SMSMessage.type == MessageType.OUTGOING.value,
            _status_in(MessageStatus.PENDING, MessageStatus.ASSIGNED),
            SMSMessage.expires_at.is_not(None),
            SMSMessage.expires_at <= func.now(),
        )
        .order_by(SMSMessage.expires_at, SMSMessage.id)
        .limit(limit)
        .with_for_update(of=SMSMessage, skip_locked=True)
    )
