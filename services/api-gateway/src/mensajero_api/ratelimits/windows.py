"""Moving-window counters in Redis, with every window of a request in one script call.

The counters keep the layout of the moving-window strategy of the `limits` package: per
window, a list of request timestamps, newest first, trimmed to the window's count, and
stored under the key that `limits` would use. `limits` checks one window per call, so a
request with two windows per rule paid for two or four calls. `acquire` checks them all
in one. With the limiter off, the API used about a tenth less CPU per send than with one
window per rule (see docs/benchmarks.md, "Round nine").
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass

from limits import RateLimitItem
from redis.asyncio import Redis

# KEYS: one list per window. ARGV: the time now, 1 to record the request or 0 to only
# test it, then each window's count and length in seconds. A window is full when its
# entry at index count - 1 is still inside it. The request is recorded in every window
# unless one is full. The reply is then that window's position (from 1) and the entry
# that has to leave it before the next request fits.
# NOTE: a count must be at least 1, as the settings require; with 0, one request per
# window would fit.
_ACQUIRE_SCRIPT = """
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
    local count = tonumber(ARGV[1 + 2 * i])
    local entry = redis.call('lindex', key, count - 1)
    if entry and tonumber(entry) >= now - tonumber(ARGV[2 + 2 * i]) then
        return {i, entry}
    end
end
if ARGV[2] == '1' then
    for i, key in ipairs(KEYS) do
        redis.call('lpush', key, ARGV[1])
        redis.call('ltrim', key, 0, tonumber(ARGV[1 + 2 * i]) - 1)
        redis.call('expire', key, ARGV[2 + 2 * i])
    end
end
return 0
"""

# KEYS: the lists of windows that counted a request. ARGV: the entry the request added.
_RELEASE_SCRIPT = """
for _, key in ipairs(KEYS) do
    redis.call('lrem', key, 1, ARGV[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Window:
    item: RateLimitItem
    # The rule's name, which keeps its counters apart from other rules' in Redis.
    namespace: str
    # The counted client: a user id, an API key's digest or an address.
    identifier: str


@dataclass(frozen=True, slots=True)
class FullWindow:
    window: Window
    # The Unix time at which the oldest request in the window leaves it.
    frees_at: float


class MovingWindows:
    def __init__(self, redis: Redis, key_prefix: str) -> None:
        self._key_prefix = key_prefix
        self._acquire = redis.register_script(_ACQUIRE_SCRIPT)
        self._release = redis.register_script(_RELEASE_SCRIPT)

    def key(self, window: Window) -> str:
        """Return the Redis key of `window`'s list, the one `limits` would use."""
        key = window.item.key_for(window.namespace, window.identifier)
        return f"{self._key_prefix}:{key}"

    async def acquire(
        self,
        windows: Sequence[Window],
        *,
        record: bool = True,
        at: float | None = None,
    ) -> FullWindow | None:
        """Count one request in every window, or in none and return the first full one.

        The request is counted at the Unix time `at`, by default now. With
        `record=False`, only test whether the request would fit. Raises RedisError or
        OSError when Redis fails.
        """
        if not windows:
            return None
        at = time.time() if at is None else at
        args: list[str | int | float] = [repr(at), 1 if record else 0]
        for window in windows:
            args += [window.item.amount, window.item.get_expiry()]
        reply = await self._acquire(keys=[self.key(w) for w in windows], args=args)
        if not reply:
            return None
        position, entry = reply
        full = windows[int(position) - 1]
        return FullWindow(full, float(entry) + full.item.get_expiry())

    async def release(self, windows: Sequence[Window], at: float) -> None:
        """Remove from `windows` the request that `acquire` counted at `at`.

        Raises RedisError or OSError when Redis fails.
        """
        if windows:
            await self._release(keys=[self.key(w) for w in windows], args=[repr(at)])
