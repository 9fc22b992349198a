"""Throttling of failed authentications per client, counted in Redis with `limits`.

A throttle counts failures only (a wrong password, an unknown device key), under one or
more scopes such as the account or the client address. Past a limit the caller rejects
the attempt before it checks the credential, so that a guessing run costs no password
hash or database lookup once throttled. The counters live in Redis, so every replica of
a service shares them. They use the moving-window strategy of `limits`: a list of failure
times per identifier and item, which gives the exact time at which the oldest failure
leaves the window, the retry-after of a rejection.

While Redis fails, checks pass and failures go uncounted, because a throttle that
rejected every attempt would lock every user and phone out. One error line is logged per
REDIS_ERROR_LOG_INTERVAL_S while that lasts.
"""

import ipaddress
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog
from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import Scope

logger = structlog.get_logger(__name__)

# While Redis fails, one error line per this many seconds instead of one per attempt.
REDIS_ERROR_LOG_INTERVAL_S = 60.0

_REDIS_ERRORS = (RedisError, StorageError, OSError)

# Length of the IPv6 prefix counted as one client. A /64 is one IPv6 subnet, in which a
# host picks addresses of its own (SLAAC, temporary privacy addresses), so counting single
# addresses would let one host move past the limit.
IPV6_CLIENT_PREFIX_LENGTH = 64


class InvalidLimitSettingError(ValueError):
    """A setting that is not a rate limit in the notation of `limits`."""

    def __init__(self, setting: str, value: str) -> None:
        self.setting = setting
        super().__init__(
            f"invalid setting {setting}: {value!r} is not a rate limit; write one or "
            "more '<count>/<period>' items with a count of at least 1, separated by "
            "';', e.g. '20/minute;200/hour'"
        )


def parse_limit_setting(setting: str, value: str) -> tuple[RateLimitItem, ...]:
    """Parse a setting such as "20/minute;200/hour", or raise InvalidLimitSettingError.

    A count of 0 is rejected too: `limits` accepts it, and it would reject every attempt.
    """
    try:
        items = parse_many(value)
    except ValueError:
        raise InvalidLimitSettingError(setting, value) from None
    if not items or any(item.amount < 1 for item in items):
        raise InvalidLimitSettingError(setting, value)
    return tuple(items)


def describe_item(item: RateLimitItem) -> str:
    """Write `item` back in the settings' notation, e.g. "20/second" or "100/2 hours"."""
    period = item.GRANULARITY.name
    if item.multiples == 1:
        return f"{item.amount}/{period}"
    return f"{item.amount}/{item.multiples} {period}s"


def client_address(scope: Scope) -> str:
    """Return the client's IP address of an ASGI request or WebSocket, as uvicorn reports it.

    uvicorn takes the address from X-Forwarded-For only when the peer's address is in
    FORWARDED_ALLOW_IPS, and ignores the header from any other peer. Behind a proxy that
    is not listed there, every client seems to come from the proxy.
    """
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def counted_address(address: str) -> str:
    """Return what a limit per client address counts for `address`.

    That is the address itself for IPv4, and its /64 network for IPv6. An IPv4-mapped
    IPv6 address (from a dual-stack socket) counts as its IPv4 address.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    network = ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX_LENGTH), strict=False)
    return str(network)


@dataclass(frozen=True)
class FailureLimit:
    # Namespace of the limit's counters in Redis, and the key of its identifier in the
    # mappings that FailureThrottle's methods take.
    scope: str
    items: tuple[RateLimitItem, ...]


@dataclass(frozen=True)
class Throttled:
    """A limit that an identifier has reached."""

    scope: str
    # The item reached, in the settings' notation, e.g. "20/minute".
    limit: str
    # Whole seconds until the oldest failure in the window expires, at least 1.
    retry_after_s: int


class FailureThrottle:
    def __init__(
        self,
        limits: Sequence[FailureLimit],
        redis: Redis,
        redis_url: str,
        key_prefix: str,
        name: str,
    ) -> None:
        """Count failures under `limits` in Redis keys that start with `key_prefix`.

        The storage uses the connection pool of `redis`, so closing that client closes
        it too. `redis_url` only selects the storage class of `limits`. `name` (such as
        "login") labels the throttle's log lines.
        """
        self._limits = tuple(limits)
        self._name = name
        storage = RedisStorage(
            "async+" + redis_url,
            implementation="redispy",
            key_prefix=key_prefix,
            # limits 5.8 documents `connection_pool` but types its keyword options as
            # scalars.
            connection_pool=redis.connection_pool,  # type: ignore[arg-type]
        )
        self._limiter = MovingWindowRateLimiter(storage)
        self._last_error_log_s = -math.inf

    async def check(self, identifiers: Mapping[str, str]) -> Throttled | None:
        """Return the first limit that one of the identifiers has reached, or None.

        `identifiers` maps each limit's scope to the identifier counted under it. The
        check counts nothing and costs one Redis round trip per item. While Redis
        fails, it returns None.
        """
        try:
            for limit in self._limits:
                for item in limit.items:
                    throttled = await self._reached(item, limit, identifiers)
                    if throttled is not None:
                        return throttled
        except _REDIS_ERRORS as error:
            self._log_redis_error("throttle not enforced: Redis failed", error)
        return None

    async def record_failure(self, identifiers: Mapping[str, str]) -> Throttled | None:
        """Count one failure under every limit and return the first limit now reached.

        The return value lets the caller log once when an identifier becomes throttled,
        instead of once per rejected attempt. Recording costs two Redis round trips per
        item.
        """
        reached: Throttled | None = None
        try:
            for limit in self._limits:
                for item in limit.items:
                    await self._limiter.hit(item, limit.scope, identifiers[limit.scope])
                    if reached is None:
                        reached = await self._reached(item, limit, identifiers)
        except _REDIS_ERRORS as error:
            self._log_redis_error("failure not counted: Redis failed", error)
        return reached

    async def clear(self, scope: str, identifier: str) -> None:
        """Forget the failures of one identifier under the limit of `scope`."""
        try:
            for limit in self._limits:
                if limit.scope != scope:
                    continue
                for item in limit.items:
                    await self._limiter.clear(item, scope, identifier)
        except _REDIS_ERRORS as error:
            self._log_redis_error("clearing failures failed: Redis failed", error)

    async def _reached(
        self, item: RateLimitItem, limit: FailureLimit, identifiers: Mapping[str, str]
    ) -> Throttled | None:
        stats = await self._limiter.get_window_stats(
            item, limit.scope, identifiers[limit.scope]
        )
        if stats.remaining > 0:
            return None
        retry_after_s = max(math.ceil(stats.reset_time - time.time()), 1)
        return Throttled(limit.scope, describe_item(item), retry_after_s)

    def _log_redis_error(self, event: str, error: Exception) -> None:
        now_s = time.monotonic()
        if now_s - self._last_error_log_s < REDIS_ERROR_LOG_INTERVAL_S:
            return
        self._last_error_log_s = now_s
        logger.error(
            event,
            throttle=self._name,
            error=repr(error),
            silent_for_s=REDIS_ERROR_LOG_INTERVAL_S,
        )
