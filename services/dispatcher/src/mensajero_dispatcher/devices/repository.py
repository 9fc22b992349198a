"""Queries on devices that the dispatcher runs."""

import uuid
from datetime import timedelta

from sqlalchemy import func, or_, update
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common.models import DeviceStatus, SMSDevice


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
