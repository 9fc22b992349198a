import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from hub_helpers import create_device, load_device
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.keys import RedisKeys
from mensajero_common.models import DeviceStatus
from mensajero_common.testing import free_port, scaled
from mensajero_hub.core.presence import ConnectionKeys, PresenceWriter

KEY_TTL_S = 60

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
async def writer(
    session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> AsyncIterator[PresenceWriter]:
    keys = ConnectionKeys(redis, redis_keys, ttl_s=KEY_TTL_S)
    presence = PresenceWriter(session_factory, redis, redis_keys, keys)
    presence.start()
    yield presence
    await presence.stop()


async def test_offline_mark_of_old_connection_is_ignored(
    writer: PresenceWriter,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    old_heartbeat = await writer.open_connection(device.device_id, "old")
    new_heartbeat = await writer.open_connection(device.device_id, "new")
    # With the key gone (expired, or lost with Redis), only the heartbeat shows that a
    # newer connection took over.
    await redis.delete(redis_keys.device_connection(device.device_id))

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
    heartbeat = await writer.open_connection(device.device_id, "older")
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
        *(writer.open_connection(device.device_id, "c") for device in devices)
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


async def test_open_of_missing_device_is_none(
    writer: PresenceWriter, redis: Redis, redis_keys: RedisKeys
) -> None:
    heartbeat = await writer.open_connection(uuid.uuid4(), "c")

    assert heartbeat is None
    assert await redis.xrange(redis_keys.device_events_stream) == []


async def test_open_claims_key_and_signals_online(
    writer: PresenceWriter,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    key = redis_keys.device_connection(device.device_id)
    await redis.set(key, "older")
    pubsub = redis.pubsub()
    await pubsub.subscribe(redis_keys.device_channel(device.device_id))

    heartbeat = await writer.open_connection(device.device_id, "newer")

    announced = None
    async with asyncio.timeout(scaled(5)):
        while announced is None:
            announced = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=1.0
            )
    await pubsub.aclose()
    row = await load_device(session_factory, device.device_id)
    events = await redis.xrange(redis_keys.device_events_stream)
    assert heartbeat is not None
    assert row.last_heartbeat == heartbeat
    assert row.status == DeviceStatus.ONLINE
    assert await redis.get(key) == b"newer"
    assert 0 < await redis.ttl(key) <= KEY_TTL_S
    assert announced["data"] == b"connected:newer"
    assert [fields for _, fields in events] == [
        {b"device_id": str(device.device_id).encode(), b"event": b"online"}
    ]


async def test_open_replaces_live_connection_in_batch(
    writer: PresenceWriter,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    await writer.open_connection(device.device_id, "older")

    touch, heartbeat = await asyncio.gather(
        writer.touch(device.device_id, "older"),
        writer.open_connection(device.device_id, "newer"),
    )

    row = await load_device(session_factory, device.device_id)
    key = redis_keys.device_connection(device.device_id)
    assert touch.newest is False
    assert touch.heartbeat_at is None
    assert heartbeat is not None
    assert row.last_heartbeat == heartbeat
    assert await redis.get(key) == b"newer"


async def test_touch_refreshes_key_and_heartbeat(
    writer: PresenceWriter,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    key = redis_keys.device_connection(device.device_id)
    first = await writer.open_connection(device.device_id, "current")
    await redis.expire(key, 5)

    touch = await writer.touch(device.device_id, "current")

    row = await load_device(session_factory, device.device_id)
    assert touch.newest is True
    assert touch.heartbeat_at is not None
    assert first is not None
    assert touch.heartbeat_at > first
    assert row.last_heartbeat == touch.heartbeat_at
    assert row.status == DeviceStatus.ONLINE
    assert await redis.get(key) == b"current"
    assert await redis.ttl(key) > 5


async def test_touch_of_replaced_connection_writes_nothing(
    writer: PresenceWriter,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    key = redis_keys.device_connection(device.device_id)
    heartbeat = await writer.open_connection(device.device_id, "older")
    await redis.set(key, "newer", ex=5)

    touch = await writer.touch(device.device_id, "older")

    row = await load_device(session_factory, device.device_id)
    assert touch.newest is False
    assert touch.heartbeat_at is None
    assert row.last_heartbeat == heartbeat
    assert await redis.get(key) == b"newer"
    assert await redis.ttl(key) <= 5


async def test_touch_recreates_expired_key(
    writer: PresenceWriter,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    key = redis_keys.device_connection(device.device_id)

    touch = await writer.touch(device.device_id, "current")

    assert touch.newest is True
    assert touch.heartbeat_at is not None
    assert await redis.get(key) == b"current"
    assert 0 < await redis.ttl(key) <= KEY_TTL_S


async def test_concurrent_touches_get_own_results(
    writer: PresenceWriter,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    devices = [await create_device(session_factory) for _ in range(20)]
    replaced = {device.device_id for device in devices[::2]}
    for device in devices:
        owner = "newer" if device.device_id in replaced else "current"
        await redis.set(redis_keys.device_connection(device.device_id), owner, ex=5)

    touches = await asyncio.gather(
        *(writer.touch(device.device_id, "current") for device in devices)
    )

    for device, touch in zip(devices, touches, strict=True):
        key = redis_keys.device_connection(device.device_id)
        row = await load_device(session_factory, device.device_id)
        if device.device_id in replaced:
            assert touch.newest is False
            assert row.last_heartbeat is None
            assert await redis.get(key) == b"newer"
        else:
            assert touch.newest is True
            assert row.last_heartbeat == touch.heartbeat_at
            assert await redis.ttl(key) > 5


async def test_writes_fail_when_redis_is_down(
    session_factory: Sessions, redis_keys: RedisKeys
) -> None:
    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    presence = PresenceWriter(
        session_factory,
        unreachable,
        redis_keys,
        ConnectionKeys(unreachable, redis_keys, ttl_s=KEY_TTL_S),
    )
    presence.start()
    touched = await create_device(session_factory)
    connecting = await create_device(session_factory)
    try:
        results = await asyncio.gather(
            presence.touch(touched.device_id, "current"),
            presence.open_connection(connecting.device_id, "new"),
            return_exceptions=True,
        )
    finally:
        await presence.stop()
        await unreachable.aclose()

    touched_row = await load_device(session_factory, touched.device_id)
    connecting_row = await load_device(session_factory, connecting.device_id)
    assert isinstance(results[0], RedisConnectionError)
    assert isinstance(results[1], RedisConnectionError)
    assert touched_row.last_heartbeat is None
    assert connecting_row.last_heartbeat is None
