import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from hub_helpers import create_device, load_device
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.keys import RedisKeys
from mensajero_common.models import DeviceStatus
from mensajero_hub.core.presence import ConnectionKeys, PresenceWriter

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
async def writer(
    session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> AsyncIterator[PresenceWriter]:
    keys = ConnectionKeys(redis, redis_keys, ttl_s=60)
    presence = PresenceWriter(session_factory, redis, redis_keys, keys)
    presence.start()
    yield presence
    await presence.stop()


async def test_offline_mark_of_old_connection_is_ignored(
    writer: PresenceWriter, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    old_heartbeat = await writer.write_heartbeat(device.device_id)
    new_heartbeat = await writer.write_heartbeat(device.device_id)

    went_offline = await writer.mark_offline(device.device_id, "old", old_heartbeat)

    row = await load_device(session_factory, device.device_id)
    assert old_heartbeat != new_heartbeat
    assert went_offline is False
    assert row.status == DeviceStatus.ONLINE


async def test_offline_mark_keeps_newer_connection_key(
    writer: PresenceWriter,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    heartbeat = await writer.write_heartbeat(device.device_id)
    await redis.set(redis_keys.device_connection(device.device_id), "newer")

    went_offline = await writer.mark_offline(device.device_id, "older", heartbeat)

    row = await load_device(session_factory, device.device_id)
    assert went_offline is False
    assert row.status == DeviceStatus.ONLINE
    assert await redis.get(redis_keys.device_connection(device.device_id)) == b"newer"


async def test_concurrent_writes_all_apply(
    writer: PresenceWriter, session_factory: Sessions
) -> None:
    devices = [await create_device(session_factory) for _ in range(40)]

    heartbeats = await asyncio.gather(
        *(writer.write_heartbeat(device.device_id) for device in devices)
    )
    results = await asyncio.gather(
        *(
            writer.mark_offline(device.device_id, "c", heartbeat)
            for device, heartbeat in zip(devices, heartbeats, strict=True)
        )
    )

    rows = [await load_device(session_factory, device.device_id) for device in devices]
    assert all(heartbeat is not None for heartbeat in heartbeats)
    assert len(set(heartbeats)) == len(devices)
    assert results == [True] * len(devices)
    assert {row.status for row in rows} == {DeviceStatus.OFFLINE}


async def test_heartbeat_of_missing_device_is_none(
    writer: PresenceWriter, session_factory: Sessions
) -> None:
    assert await writer.write_heartbeat(uuid.uuid4()) is None
