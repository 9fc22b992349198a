"""Registering, changing and deleting devices, and rotating their API keys.

A device's API key is shown once and stored only as a SHA-256 hash. Rotating the key,
deleting the device or disabling it publishes `revoke` on the device's channel after the
commit, so the device-hub closes a live WebSocket that still uses the old key.
"""

import uuid
from datetime import UTC, datetime, timedelta

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.devices import repository
from mensajero_api.devices.schemas import DeviceCreate, DeviceListQuery, DeviceUpdate
from mensajero_api.pagination import Listing, decode_cursor, split_page
from mensajero_api.phones import normalize_phone_number
from mensajero_api.quotas import repository as quotas_repository
from mensajero_api.quotas import service as quotas_service
from mensajero_common import apikeys, queues
from mensajero_common.errors import ConflictError, NotFoundError
from mensajero_common.keys import CHANNEL_DISABLE, CHANNEL_REVOKE, RedisKeys
from mensajero_common.models import DeviceStatus, SMSDevice, User
from mensajero_common.settings import Settings

logger = structlog.get_logger(__name__)


class DeviceNotFoundError(NotFoundError):
    """The device does not exist or belongs to another user (never a 403, so ids don't leak)."""

    code = "device_not_found"

    def __init__(self, device_id: uuid.UUID) -> None:
        super().__init__(
            device_id=str(device_id), details={"device_id": str(device_id)}
        )


class DeviceInactiveError(ConflictError):
    code = "device_inactive"

    def __init__(self, device_id: uuid.UUID) -> None:
        super().__init__(
            device_id=str(device_id), details={"device_id": str(device_id)}
        )


def _key_expiry(expires_in_days: int | None) -> datetime | None:
    if expires_in_days is None:
        return None
    return datetime.now(UTC) + timedelta(days=expires_in_days)


async def get_device(
    session: AsyncSession,
    user: User,
    device_id: uuid.UUID,
    *,
    lock: repository.DeviceLock | None = None,
) -> SMSDevice:
    """Return the user's device, its row locked if `lock` is given (see
    repository.get_device), or raise DeviceNotFoundError."""
    device = await repository.get_device(session, user.id, device_id, lock=lock)
    if device is None:
        raise DeviceNotFoundError(device_id)
    return device


async def list_devices(
    session: AsyncSession, user: User, query: DeviceListQuery
) -> tuple[list[SMSDevice], str | None]:
    """Return one page of the user's devices and the cursor of the next page, if any.

    A cursor only positions the walk: the query is always scoped to `user`, so a cursor
    taken from another user's listing returns this user's rows after that position.
    """
    after = (
        decode_cursor(query.cursor, query.order, Listing.DEVICES)
        if query.cursor
        else None
    )
    filters = repository.DeviceFilters(
        statuses=tuple(query.status or ()), is_active=query.is_active
    )
    rows = await repository.list_devices(
        session,
        user.id,
        filters,
        after=after,
        descending=query.order == "desc",
        limit=query.limit + 1,
    )
    return split_page(rows, query.limit, query.order, Listing.DEVICES)


async def register_device(
    session: AsyncSession, settings: Settings, user: User, data: DeviceCreate
) -> tuple[SMSDevice, str]:
    """Create a device and its API key within the plan's device limit; commit.

    Returns the device and the API key in clear, which is never stored.
    """
    phone_number = None
    if data.phone_number is not None:
        phone_number = normalize_phone_number(data.phone_number, user.default_region)

    await quotas_service.take_device_slot(session, user.id, settings)
    api_key = apikeys.generate_api_key(settings.DEVICE_API_KEY_PREFIX)
    device = await repository.insert_device(
        session,
        user_id=user.id,
        name=data.name,
        phone_number=phone_number,
        api_key_hash=apikeys.hash_api_key(api_key),
        api_key_prefix=apikeys.display_prefix(api_key),
        api_key_expires_at=_key_expiry(data.api_key_expires_in_days),
    )
    await session.commit()

    logger.info("device registered", user_id=str(user.id), device_id=str(device.id))
    return device, api_key


async def _save_and_reload(session: AsyncSession, device: SMSDevice) -> None:
    """Write the changes to a device that get_device locked, load it back, and commit.

    updated_at is set by the database on UPDATE, so it is read back. That happens
    before the commit, while the row is still locked: once the commit releases it, a
    concurrent delete may remove the row, and the read would fail.
    """
    await session.flush()
    await session.refresh(device)
    await session.commit()


async def update_device(
    session: AsyncSession,
    redis: Redis,
    keys: RedisKeys,
    user: User,
    device_id: uuid.UUID,
    data: DeviceUpdate,
) -> SMSDevice:
    device = await get_device(session, user, device_id, lock="update")
    changes = data.model_dump(include=data.model_fields_set)
    if changes.get("phone_number") is not None:
        changes["phone_number"] = normalize_phone_number(
            changes["phone_number"], user.default_region
        )

    was_active = device.is_active
    for name, value in changes.items():
        setattr(device, name, value)
    disabled = was_active and not device.is_active
    if disabled:
        _show_offline(device)
    await _save_and_reload(session, device)

    if disabled:
        logger.info("device disabled", user_id=str(user.id), device_id=str(device.id))
        await _close_connection(redis, keys, device.id, CHANNEL_DISABLE)
    return device


def _show_offline(device: SMSDevice) -> None:
    """Mark an online device offline, because the caller closes its connection.

    The response then does not show it online. The device-hub writes the same status
    when the connection ends.
    """
    if device.status == DeviceStatus.ONLINE:
        device.status = DeviceStatus.OFFLINE


async def rotate_api_key(
    session: AsyncSession,
    redis: Redis,
    keys: RedisKeys,
    settings: Settings,
    user: User,
    device_id: uuid.UUID,
    expires_in_days: int | None = None,
) -> tuple[SMSDevice, str]:
    """Replace the device's API key; the old key stops working at the commit.

    The new key expires after `expires_in_days`, or never when it is None.
    """
    device = await get_device(session, user, device_id, lock="update")
    api_key = apikeys.generate_api_key(settings.DEVICE_API_KEY_PREFIX)
    device.api_key_hash = apikeys.hash_api_key(api_key)
    device.api_key_prefix = apikeys.display_prefix(api_key)
    device.api_key_expires_at = _key_expiry(expires_in_days)
    _show_offline(device)
    await _save_and_reload(session, device)

    logger.info(
        "device API key rotated", user_id=str(user.id), device_id=str(device.id)
    )
    await _close_connection(redis, keys, device.id, CHANNEL_REVOKE)
    return device, api_key


async def delete_device(
    session: AsyncSession,
    redis: Redis,
    keys: RedisKeys,
    user: User,
    device_id: uuid.UUID,
) -> None:
    """Delete the device, give its slot back to the quota, and close its connection."""
    if not await repository.delete_device(session, user.id, device_id):
        raise DeviceNotFoundError(device_id)
    await quotas_repository.release_device_slot(session, user.id)
    await session.commit()

    logger.info("device deleted", user_id=str(user.id), device_id=str(device_id))
    await _close_connection(redis, keys, device_id, CHANNEL_REVOKE)
    try:
        # The device can never connect again, so its task stream would only take memory.
        await redis.delete(keys.device_tasks_stream(device_id))
    except RedisError:
        logger.exception(
            "deleting the task stream of a device failed", device_id=str(device_id)
        )


async def _close_connection(
    redis: Redis, keys: RedisKeys, device_id: uuid.UUID, message: str
) -> None:
    """Tell the hub to close the device's live connection: `message` is CHANNEL_REVOKE
    (close code 4003) or CHANNEL_DISABLE (close code 4001, reason device_inactive)."""
    # The change is committed either way. If Redis is down, the hub misses this message,
    # so a live socket with the old key stays open until it disconnects, and connecting
    # again with that key fails.
    try:
        await queues.publish_device_control(redis, keys, device_id, message)
    except RedisError:
        logger.exception(
            "publishing a device control message failed",
            device_id=str(device_id),
            control_message=message,
        )
