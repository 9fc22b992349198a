"""Queries on devices that the dispatcher runs."""

import uuid
from collections.abc import Collection
from datetime import timedelta

from sqlalchemy import Select, func, literal_column, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common.db import literal_in
from mensajero_common.models import (
    DeviceStatus,
    MessageStatus,
    MessageType,
    SMSDevice,
    SMSMessage,
)


async def mark_silent_devices_offline(
    session: AsyncSession, *, silent_for_s: float
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Set `offline` on online devices with no heartbeat for `silent_for_s` seconds.

    Returns (device id, user id) of each device changed.
    """
    statement = (
        update(SMSDevice)
        .where(
            SMSDevice.status == DeviceStatus.ONLINE,
            or_(
                SMSDevice.last_heartbeat.is_(None),
                SMSDevice.last_heartbeat < func.now() - timedelta(seconds=silent_for_s),
            ),
        )
        .values(status=DeviceStatus.OFFLINE)
        .returning(SMSDevice.id, SMSDevice.user_id)
    )
    return [(row.id, row.user_id) for row in (await session.execute(statement)).all()]


async def find_online_devices_with_waiting_messages(
    session: AsyncSession, device_ids: Collection[uuid.UUID]
) -> set[uuid.UUID]:
    """Return those of `device_ids` that are online and active and whose user has an
    outgoing message pending or assigned."""
    statement = waiting_messages_statement(device_ids)
    return set((await session.scalars(statement)).all())


def waiting_messages_statement(
    device_ids: Collection[uuid.UUID],
) -> Select[uuid.UUID]:
    """Build the statement of find_online_devices_with_waiting_messages.

    The statuses are written into the SQL instead of bound, so that a generic plan of the
    prepared statement can use the partial index of waiting messages too. The test of
    each user's messages is a LATERAL subquery with a LIMIT, which Postgres cannot turn
    into a join. As an EXISTS, on statistics taken before a backlog, the planner read
    every waiting message of all users and matched the user afterwards.
    """
    waiting = (
        select(literal_column("1").label("waiting"))
        .where(
            SMSMessage.user_id == SMSDevice.user_id,
            SMSMessage.type == MessageType.OUTGOING,
            literal_in(
                SMSMessage.status, (MessageStatus.PENDING, MessageStatus.ASSIGNED)
            ),
        )
        .limit(1)
        .lateral("waiting")
    )
    return (
        select(SMSDevice.id)
        .join(waiting, true())
        .where(
            SMSDevice.id.in_(device_ids),
            SMSDevice.status == DeviceStatus.ONLINE,
            SMSDevice.is_active.is_(True),
        )
    )
