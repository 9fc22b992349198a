"""Sending pace of each device: at most DEVICE_SMS_PER_MINUTE tasks in any 60 seconds.

Carriers block SIMs that send in bursts, and Android asks the user before an app sends
too many SMS, so the dispatcher hands each device tasks at a steady pace. The counters are
moving windows of the `limits` package in Redis, shared by every dispatcher replica.

The assignment plans as if every device had pace left, then reserves what the plan
gives each device, which costs one Redis call per chosen device. A device that has no
room for all of its share keeps the oldest messages that still fit. Only then does the
assignment read the pace left of every candidate device and plan the other messages
again with it, and those that fit nowhere stay pending. A pending message is not signalled again: the pending sweep (every
DISPATCHER_SWEEP_INTERVAL) or the device's next `online` event assigns it once a window
has room, so paced messages cost one read per sweep and never a loop.

NOTE: a paced message may wait up to one DISPATCHER_SWEEP_INTERVAL after its device's
window has room again.
"""

import asyncio
import uuid
import weakref
from collections.abc import Collection

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from mensajero_dispatcher.context import DispatcherContext
from mensajero_dispatcher.messages.schemas import Assignment, AssignmentPlan

# Max devices whose pace one `reserve` call reserves at once, each over its own Redis
# connection.
RESERVE_CONCURRENCY = 8

# One limiter per Redis client, since a limiter's storage shares the client's pool.
_limiters: "weakref.WeakKeyDictionary[Redis, MovingWindowRateLimiter]" = (
    weakref.WeakKeyDictionary()
)


def pace_item(ctx: DispatcherContext) -> RateLimitItem:
    return RateLimitItemPerMinute(ctx.settings.DEVICE_SMS_PER_MINUTE)


def _limiter(ctx: DispatcherContext) -> MovingWindowRateLimiter:
    limiter = _limiters.get(ctx.redis)
    if limiter is None:
        storage = RedisStorage(
            "async+" + ctx.settings.REDIS_URL,
            implementation="redispy",
            key_prefix=ctx.keys.device_pace_prefix,
            # The stubs of `limits` type options as scalars; redis-py takes the pool.
            connection_pool=ctx.redis.connection_pool,  # type: ignore[arg-type]
        )
        limiter = MovingWindowRateLimiter(storage)
        _limiters[ctx.redis] = limiter
    return limiter


async def pace_left(
    ctx: DispatcherContext, device_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """Return how many more tasks each device may be handed in the current window."""
    limiter = _limiter(ctx)
    item = pace_item(ctx)
    left: dict[uuid.UUID, int] = {}
    for device_id in device_ids:
        stats = await limiter.get_window_stats(item, str(device_id))
        left[device_id] = max(0, stats.remaining)
    return left


async def reserve(ctx: DispatcherContext, plan: AssignmentPlan) -> list[Assignment]:
    """Take the pace of every assignment in `plan`; remove from `plan.assignments` those
    that no longer fit and return them.

    One call per device of the plan, which is one round trip per device while it is
    below its pace. The calls of up to RESERVE_CONCURRENCY devices are in flight at once.
    A reservation whose assignment then fails to commit stays taken: the device is paced
    a little below the limit for one window, never above it.
    """
    by_device: dict[uuid.UUID, int] = {}
    for assignment in plan.assignments:
        by_device[assignment.device_id] = by_device.get(assignment.device_id, 0) + 1

    slots = asyncio.Semaphore(RESERVE_CONCURRENCY)

    async def reserve_one(device_id: uuid.UUID, requested: int) -> int:
        async with slots:
            return await _reserve_device(ctx, device_id, requested)

    counts = await asyncio.gather(
        *(reserve_one(device_id, n) for device_id, n in by_device.items())
    )
    granted = dict(zip(by_device, counts, strict=True))

    reserved: list[Assignment] = []
    denied: list[Assignment] = []
    for assignment in plan.assignments:
        if granted[assignment.device_id] > 0:
            granted[assignment.device_id] -= 1
            reserved.append(assignment)
        else:
            denied.append(assignment)
    plan.assignments = reserved
    return denied


async def _reserve_device(
    ctx: DispatcherContext, device_id: uuid.UUID, requested: int
) -> int:
    """Reserve up to `requested` tasks of the device's pace and return how many it got."""
    limiter = _limiter(ctx)
    item = pace_item(ctx)
    if await limiter.hit(item, str(device_id), cost=requested):
        return requested
    # The device reached its pace, or another replica handed it tasks meanwhile.
    stats = await limiter.get_window_stats(item, str(device_id))
    fits = min(requested, max(0, stats.remaining))
    if fits and await limiter.hit(item, str(device_id), cost=fits):
        return fits
    return 0
