"""Sending pace of each device: at most DEVICE_SMS_PER_MINUTE tasks in any 60 seconds.

Carriers block SIMs that send in bursts, and Android asks the user before an app sends
too many SMS, so the dispatcher hands each device tasks at a steady pace. The counters are
moving windows in Redis, shared by every dispatcher replica, in the layout of the `limits`
package's moving window: per device, a list of task timestamps, newest first, trimmed to
the window's count, under the key that `limits` would use.

The assignment plans as if every device had pace left, then reserves what the plan
gives each device, in one Redis call for all of them. A device that has no room for all
of its share keeps the oldest messages that still fit. Only then does the assignment
read the pace left of every candidate device and plan the other messages again with it,
and those that fit nowhere stay pending. A pending message is not signalled again: the
pending sweep (every DISPATCHER_SWEEP_INTERVAL) or the device's next `online` event
assigns it once a window has room, so paced messages cost one read per sweep and never a
loop.

NOTE: a paced message may wait up to one DISPATCHER_SWEEP_INTERVAL after its device's
window has room again.
"""

import time
import uuid
import weakref
from collections.abc import Collection, Mapping

from limits import RateLimitItem, RateLimitItemPerMinute
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from mensajero_dispatcher.context import DispatcherContext
from mensajero_dispatcher.messages.schemas import Assignment, AssignmentPlan

# KEYS: one list per device. ARGV: the time now, the window's length in seconds, its
# count, 1 to record the tasks granted or 0 to only read, then the tasks requested for
# each device. k tasks fit in a window when its entry at index count - k has left it, or
# there is none, as in the `limits` moving window. The reply is, for each device, the
# most tasks that fit, up to the number requested.
_RESERVE_SCRIPT = """
local now = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local oldest = now - expiry
local granted = {}
for i, key in ipairs(KEYS) do
    local low, high = 0, math.min(tonumber(ARGV[4 + i]), limit)
    while low < high do
        local mid = math.floor((low + high + 1) / 2)
        local entry = redis.call('lindex', key, limit - mid)
        if not entry or tonumber(entry) < oldest then
            low = mid
        else
            high = mid - 1
        end
    end
    granted[i] = low
    if ARGV[4] == '1' and low > 0 then
        local entries = {}
        for j = 1, low do
            entries[j] = ARGV[1]
        end
        redis.call('lpush', key, unpack(entries))
        redis.call('ltrim', key, 0, limit - 1)
        redis.call('expire', key, expiry)
    end
end
return granted
"""


# One script object per Redis client, which keeps the script's digest.
_scripts: "weakref.WeakKeyDictionary[Redis, AsyncScript]" = weakref.WeakKeyDictionary()


def pace_item(ctx: DispatcherContext) -> RateLimitItem:
    return RateLimitItemPerMinute(ctx.settings.DEVICE_SMS_PER_MINUTE)


def pace_key(ctx: DispatcherContext, device_id: uuid.UUID) -> str:
    """Return the Redis key of the device's window, the one `limits` would use."""
    return f"{ctx.keys.device_pace_prefix}:{pace_item(ctx).key_for(str(device_id))}"


async def _fit(
    ctx: DispatcherContext, wanted: Mapping[uuid.UUID, int], *, record: bool
) -> dict[uuid.UUID, int]:
    """Return the tasks that fit in each device's window, up to `wanted`, and with
    `record` count them in it, all in one Redis call."""
    if not wanted:
        return {}
    item = pace_item(ctx)
    script = _scripts.get(ctx.redis)
    if script is None:
        script = _scripts[ctx.redis] = ctx.redis.register_script(_RESERVE_SCRIPT)
    args: list[str | int] = [
        repr(time.time()),
        item.get_expiry(),
        item.amount,
        1 if record else 0,
        *wanted.values(),
    ]
    keys = [pace_key(ctx, device_id) for device_id in wanted]
    granted = await script(keys=keys, args=args)
    return {
        device_id: int(count) for device_id, count in zip(wanted, granted, strict=True)
    }


async def pace_left(
    ctx: DispatcherContext, device_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """Return how many more tasks each device may be handed in the current window."""
    limit = pace_item(ctx).amount
    return await _fit(ctx, dict.fromkeys(device_ids, limit), record=False)


async def reserve(ctx: DispatcherContext, plan: AssignmentPlan) -> list[Assignment]:
    """Take the pace of every assignment in `plan`; remove from `plan.assignments` those
    that no longer fit and return them.

    One Redis call for every device of the plan. A reservation whose assignment then
    fails to commit stays taken: the device is paced a little below the limit for one
    window, never above it.
    """
    by_device: dict[uuid.UUID, int] = {}
    for assignment in plan.assignments:
        by_device[assignment.device_id] = by_device.get(assignment.device_id, 0) + 1
    granted = await _fit(ctx, by_device, record=True)

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
