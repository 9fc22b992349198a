import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from mensajero_common.keys import RedisKeys
from mensajero_common.testing import scaled
from mensajero_hub.core.channels import SUBSCRIBE_CONFIRM_TIMEOUT_S, DeviceChannelRouter


@pytest.fixture
async def router(
    redis: Redis, redis_keys: RedisKeys
) -> AsyncIterator[DeviceChannelRouter]:
    channel_router = DeviceChannelRouter(
        redis, redis_keys, on_message=lambda *_: None, on_reconnect=lambda: None
    )
    await channel_router.start()
    yield channel_router
    await channel_router.stop()


async def test_cancelled_subscribe_leaves_no_waiter(
    router: DeviceChannelRouter,
) -> None:
    device_id = uuid.uuid4()
    # Holding the command lock keeps the SUBSCRIBE from being sent, as a Redis error
    # before the write would.
    async with router._command_lock:
        cancelled = asyncio.create_task(router.subscribe(device_id))
        await asyncio.sleep(0.05)
        cancelled.cancel()
    # The cancelled call takes the lock again to unsubscribe, so it ends only now.
    with pytest.raises(asyncio.CancelledError):
        await cancelled

    # A stale waiter would take this SUBSCRIBE's confirmation, and this call would
    # return only after SUBSCRIBE_CONFIRM_TIMEOUT_S.
    async with asyncio.timeout(min(scaled(2.0), SUBSCRIBE_CONFIRM_TIMEOUT_S - 1)):
        await router.subscribe(device_id)

    assert router._confirmations == {}
    assert router.channel_count() == 1
