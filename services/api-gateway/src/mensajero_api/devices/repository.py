"""Queries on the `smsdevice` table, always scoped to the owning user."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.pagination import Cursor, check_cursor_origin, keyset_walk
from mensajero_common.db import delete_owned_row
from mensajero_common.models import DeviceStatus, MessageStatus, SMSDevice, SMSMessage

# Message statuses that are not final: other transactions may still lock such messages.
_OPEN_MESSAGE_STATUSES = (
    MessageStatus.PENDING,
    MessageStatus.ASSIGNED,
    MessageStatus.SENDING,
    MessageStatus.SENT,
)


@dataclass(frozen=True)
class DeviceFilters:
    statuses: Sequence[DeviceStatus] = ()
    is_active: bool | None = None


async def insert_device(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    name: str,
    phone_number: str | None,
    api_key_hash: str,
    api_key_prefix: str,
    api_key_expires_at: datetime | None = None,
) -> SMSDevice:
    device = SMSDevice(
        user_id=user_id,
        name=name,
        phone_number=phone_number,
        api_key_hash=api_key_hash,
        api_key_prefix=api_key_prefix,
        api_key_expires_at=api_key_expires_at,
    )
    session.add(device)
    # The INSERT returns the server defaults (status, is_active, timestamps) as well.
    await session.flush()
    return device


async def list_devices(
    session: AsyncSession,
    user_id: uuid.UUID,
    filters: DeviceFilters,
    *,
    after: Cursor | None,
    descending: bool,
    limit: int,
) -> Sequence[SMSDevice]:
    """Return up to `limit` devices in (created_at, id) order, starting after `after`."""
    await check_cursor_origin(
        session, after, SMSDevice.created_at, SMSDevice.id, SMSDevice.user_id == user_id
    )
    statement = select(SMSDevice).where(SMSDevice.user_id == user_id)
    if filters.statuses:
        statement = statement.where(SMSDevice.status.in_(filters.statuses))
    if filters.is_active is not None:
        statement = statement.where(SMSDevice.is_active.is_(filters.is_active))

    statement = keyset_walk(
        statement, SMSDevice.created_at, SMSDevice.id, after, descending=descending
    )
    return (await session.scalars(statement.limit(limit))).all()


# Row locks that get_device can take until the transaction ends: "update" (FOR NO KEY
# UPDATE) before changing the device's row, "key_share" (FOR KEY SHARE) before inserting
# a message that references it. Only the first makes other updates of the device wait.
DeviceLock = Literal["update", "key_share"]


async def get_device(
    session: AsyncSession,
    user_id: uuid.UUID,
    device_id: uuid.UUID,
    *,
    lock: DeviceLock | None = None,
) -> SMSDevice | None:
    """Find the user's device, and lock its row if `lock` is given.

    Either lock makes a concurrent delete of the device wait for the caller's
    transaction. When the delete commits first, the locked read returns None, so the
    caller never goes on to update a row that is gone or reference it.
    """
    statement = select(SMSDevice).where(
        SMSDevice.id == device_id, SMSDevice.user_id == user_id
    )
    if lock is not None:
        statement = statement.with_for_update(
            read=lock == "key_share", key_share=True
        ).execution_options(populate_existing=True)
    return (await session.scalars(statement)).one_or_none()


async def delete_device(
    session: AsyncSession, user_id: uuid.UUID, device_id: uuid.UUID
) -> bool:
    """Delete the device; tell whether it existed. Its messages keep device_id NULL."""
    # The foreign key's ON DELETE SET NULL rewrites the device's messages in no fixed
    # order, but bulk cancels and the hub's report batches lock many messages in id
    # order. Locking the open messages in id order first makes the delete wait for
    # those transactions instead of deadlocking with them.
    await session.execute(
        select(SMSMessage.id)
        .where(
            SMSMessage.device_id == device_id,
            SMSMessage.user_id == user_id,
            SMSMessage.status.in_([status.value for status in _OPEN_MESSAGE_STATUSES]),
        )
        .order_by(SMSMessage.id)
        .with_for_update()
    )
    return await delete_owned_row(session, SMSDevice, device_id, user_id)
