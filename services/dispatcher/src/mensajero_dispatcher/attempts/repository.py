"""Queries that find attempts past a deadline and messages past their expiry.

Each one locks the rows it returns with FOR UPDATE SKIP LOCKED, so replicas running the
same check at once split the work, and a row that a report is changing is left alone.
"""

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import ColumnElement, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

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
            SMSMessage.status == MessageStatus.ASSIGNED.value,
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
    rows = (await session.execute(statement)).all()
    return [StalledTask(row.id, row.device_id, max(row.attempts, 1)) for row in rows]


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
    statement = (
        select(SMSMessage.id, SMSMessage.device_id, SMSMessage.attempts)
        .where(
            SMSMessage.type == MessageType.OUTGOING.value,
            SMSMessage.status == MessageStatus.SENDING.value,
            SMSMessage.sending_at < func.now() - timedelta(seconds=report_timeout_s),
        )
        .order_by(SMSMessage.sending_at, SMSMessage.id)
        .limit(limit)
        .with_for_update(of=SMSMessage, skip_locked=True)
    )
    rows = (await session.execute(statement)).all()
    return [StalledTask(row.id, row.device_id, max(row.attempts, 1)) for row in rows]


async def lock_deleted_device_tasks(
    session: AsyncSession, *, limit: int
) -> list[StalledTask]:
    """Lock `assigned` and `sending` messages whose device was deleted.

    Deleting a device sets `device_id` to NULL on its messages (ON DELETE SET NULL), and
    an assignment always sets it, so an in-flight message without a device lost its own.
    """
    statement = (
        select(SMSMessage.id, SMSMessage.device_id, SMSMessage.attempts)
        .where(
            SMSMessage.type == MessageType.OUTGOING.value,
            SMSMessage.status.in_(
                [MessageStatus.ASSIGNED.value, MessageStatus.SENDING.value]
            ),
            SMSMessage.device_id.is_(None),
        )
        .order_by(SMSMessage.id)
        .limit(limit)
        .with_for_update(of=SMSMessage, skip_locked=True)
    )
    rows = (await session.execute(statement)).all()
    return [StalledTask(row.id, row.device_id, max(row.attempts, 1)) for row in rows]


async def lock_expired(session: AsyncSession, *, limit: int) -> list[StalledTask]:
    """Lock `pending` and `assigned` messages whose `expires_at` has passed.

    A `sending` message is left to finish: its phone has the SMS in hand already.
    """
    statement = (
        select(SMSMessage.id, SMSMessage.device_id, SMSMessage.attempts)
        .where(
            SMSMessage.type == MessageType.OUTGOING.value,
            SMSMessage.status.in_(
                [MessageStatus.PENDING.value, MessageStatus.ASSIGNED.value]
            ),
            SMSMessage.expires_at.is_not(None),
            SMSMessage.expires_at <= func.now(),
        )
        .order_by(SMSMessage.expires_at, SMSMessage.id)
        .limit(limit)
        .with_for_update(of=SMSMessage, skip_locked=True)
    )
    rows = (await session.execute(statement)).all()
    return [StalledTask(row.id, row.device_id, max(row.attempts, 1)) for row in rows]
