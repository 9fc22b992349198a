"""Per-device sending pace: at most DEVICE_SMS_PER_MINUTE tasks per device per minute."""

import asyncio
import time
from dataclasses import replace

import pytest
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from mensajero_common import queues
from mensajero_common.keys import RedisKeys
from mensajero_common.models import MessageStatus
from mensajero_dispatcher.context import DispatcherContext
from mensajero_dispatcher.messages.service import (
    assign_messages,
    assign_pending_messages,
)
from mensajero_dispatcher.pace import service as pace

PER_MINUTE = 2


@pytest.fixture
def paced_ctx(ctx: DispatcherContext) -> DispatcherContext:
    settings = ctx.settings.model_copy(update={"DEVICE_SMS_PER_MINUTE": PER_MINUTE})
    return replace(ctx, settings=settings)


def _limits_limiter(ctx: DispatcherContext) -> MovingWindowRateLimiter:
    """Return a limiter of the `limits` package on the devices' pace counters."""
    storage = RedisStorage(
        "async+" + ctx.settings.REDIS_URL,
        implementation="redispy",
        key_prefix=ctx.keys.device_pace_prefix,
        connection_pool=ctx.redis.connection_pool,
    )
    return MovingWindowRateLimiter(storage)


async def _open_window(redis: "Redis[bytes]", keys: RedisKeys) -> None:
    """Drop the pace counters, as if a minute had passed since the last task."""
    stale = await redis.keys(f"{keys.device_pace_prefix}*")
    assert stale
    await redis.delete(*stale)


async def _statuses(factory, messages) -> list[MessageStatus]:
    return [(await factory.reload(message)).status for message in messages]


async def test_device_gets_pace_then_waits(paced_ctx, factory, redis, redis_keys):
    user = await factory.user()
    device = await factory.device(user)
    messages = [await factory.message(user, age_s=60 - i) for i in range(4)]

    plan = await assign_messages(paced_ctx, [message.id for message in messages])

    assert [item.message.id for item in plan.assignments] == [
        message.id for message in messages[:PER_MINUTE]
    ]
    assert {message.id for message in plan.waiting} == {
        message.id for message in messages[PER_MINUTE:]
    }
    assert await _statuses(factory, messages) == [
        MessageStatus.ASSIGNED,
        MessageStatus.ASSIGNED,
        MessageStatus.PENDING,
        MessageStatus.PENDING,
    ]
    tasks = await queues.read_device_tasks(redis, redis_keys, device.id)
    assert len(tasks) == PER_MINUTE


async def test_pace_window_resets_within_a_minute(paced_ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    messages = [await factory.message(user) for _ in range(PER_MINUTE)]

    await assign_messages(paced_ctx, [message.id for message in messages])

    assert await pace.pace_left(paced_ctx, [device.id]) == {device.id: 0}
    limiter = _limits_limiter(paced_ctx)
    stats = await limiter.get_window_stats(pace.pace_item(paced_ctx), str(device.id))
    assert 0 < stats.reset_time - time.time() <= 60


async def test_paced_device_passes_message_on(paced_ctx, factory):
    user = await factory.user()
    busy = await factory.device(user)
    first = [await factory.message(user, requested_device=busy) for _ in range(2)]
    await assign_messages(paced_ctx, [message.id for message in first])
    other = await factory.device(user)
    message = await factory.message(user)

    plan = await assign_messages(paced_ctx, [message.id])

    assert [item.device_id for item in plan.assignments] == [other.id]


async def test_requested_paced_device_waits(paced_ctx, factory):
    user = await factory.user()
    busy = await factory.device(user)
    await factory.device(user)
    messages = [await factory.message(user, requested_device=busy) for _ in range(3)]

    plan = await assign_messages(paced_ctx, [message.id for message in messages])

    assert len(plan.assignments) == PER_MINUTE
    assert {item.device_id for item in plan.assignments} == {busy.id}
    assert [message.id for message in plan.waiting] == [messages[-1].id]
    stored = await factory.reload(messages[-1])
    assert stored.status == MessageStatus.PENDING


async def test_sweep_assigns_when_window_opens(paced_ctx, factory, redis, redis_keys):
    user = await factory.user()
    device = await factory.device(user)
    messages = [await factory.message(user, age_s=60 - i) for i in range(5)]

    assert await assign_pending_messages(paced_ctx) == PER_MINUTE
    assert await assign_pending_messages(paced_ctx) == 0

    await _open_window(redis, redis_keys)
    assert await assign_pending_messages(paced_ctx) == PER_MINUTE
    assert await assign_pending_messages(paced_ctx) == 0

    assert await _statuses(factory, messages) == [MessageStatus.ASSIGNED] * 4 + [
        MessageStatus.PENDING
    ]
    tasks = await queues.read_device_tasks(redis, redis_keys, device.id)
    assert [message_id for _, message_id, _ in tasks] == [
        message.id for message in messages[:4]
    ]


async def test_concurrent_batches_share_pace(paced_ctx, factory, redis, redis_keys):
    user = await factory.user()
    device = await factory.device(user)
    messages = [await factory.message(user) for _ in range(6)]
    ids = [message.id for message in messages]

    plans = await asyncio.gather(
        assign_messages(paced_ctx, ids[:3]), assign_messages(paced_ctx, ids[3:])
    )

    assert sum(len(plan.assignments) for plan in plans) == PER_MINUTE
    tasks = await queues.read_device_tasks(redis, redis_keys, device.id)
    assert len(tasks) == PER_MINUTE


async def test_batch_reserves_pace_of_many_devices(
    paced_ctx, factory, redis, redis_keys
):
    user = await factory.user()
    device_count = 11
    devices = [await factory.device(user) for _ in range(device_count)]
    messages = [
        await factory.message(user, age_s=600 - i)
        for i in range(device_count * (PER_MINUTE + 1))
    ]

    plan = await assign_messages(paced_ctx, [message.id for message in messages])

    assert len(plan.assignments) == device_count * PER_MINUTE
    assert len(plan.waiting) == device_count
    for device in devices:
        tasks = await queues.read_device_tasks(redis, redis_keys, device.id)
        assert len(tasks) == PER_MINUTE, device.id
    assert await pace.pace_left(paced_ctx, [device.id for device in devices]) == {
        device.id: 0 for device in devices
    }


async def test_full_device_found_after_planning(paced_ctx, factory):
    user = await factory.user()
    full = await factory.device(user)
    other = await factory.device(user)
    # The full device has the lighter load, so the plan tries it first.
    await factory.message(user, status=MessageStatus.ASSIGNED, device=other)
    limiter = _limits_limiter(paced_ctx)
    await limiter.hit(pace.pace_item(paced_ctx), str(full.id), cost=PER_MINUTE)
    message = await factory.message(user)

    plan = await assign_messages(paced_ctx, [message.id])

    assert [item.device_id for item in plan.assignments] == [other.id]
    assert plan.waiting == []


async def test_pace_not_read_while_devices_have_room(paced_ctx, factory, monkeypatch):
    user = await factory.user()
    for _ in range(5):
        await factory.device(user)
    message = await factory.message(user)
    reads: list[set] = []
    read_pace = pace.pace_left

    async def recorded_read(ctx, device_ids):
        reads.append(set(device_ids))
        return await read_pace(ctx, device_ids)

    monkeypatch.setattr(pace, "pace_left", recorded_read)

    plan = await assign_messages(paced_ctx, [message.id])

    assert len(plan.assignments) == 1
    assert reads == []


async def test_batch_reserves_pace_in_one_call(paced_ctx, factory, monkeypatch):
    user = await factory.user()
    devices = [await factory.device(user) for _ in range(6)]
    messages = [await factory.message(user, age_s=600 - i) for i in range(12)]
    calls: list[tuple] = []
    evalsha = paced_ctx.redis.evalsha

    async def counted(*args):
        calls.append(args)
        return await evalsha(*args)

    monkeypatch.setattr(paced_ctx.redis, "evalsha", counted)

    plan = await assign_messages(paced_ctx, [message.id for message in messages])

    prefix = paced_ctx.keys.device_pace_prefix
    pace_calls = [call for call in calls if str(call[2]).startswith(prefix)]
    assert len(plan.assignments) == len(devices) * PER_MINUTE
    assert len(pace_calls) == 1


async def test_limits_reads_reserved_pace(paced_ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    message = await factory.message(user)

    await assign_messages(paced_ctx, [message.id])

    stats = await _limits_limiter(paced_ctx).get_window_stats(
        pace.pace_item(paced_ctx), str(device.id)
    )
    assert stats.remaining == PER_MINUTE - 1
    assert await pace.pace_left(paced_ctx, [device.id]) == {device.id: PER_MINUTE - 1}
