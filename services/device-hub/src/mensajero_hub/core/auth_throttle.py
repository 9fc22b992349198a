"""Throttling of failed device authentications per client address.

Each failed authentication (a missing, unknown, expired or disabled key) counts against
the client's address under DEVICE_AUTH_FAILURES_PER_IP, in Redis, so every hub replica
shares the count. Past the limit the hub rejects the address's new connections before it
looks their keys up in Postgres, valid keys included, until the oldest failure leaves the
window. Successful authentications count nothing. While Redis fails, nothing is throttled.

NOTE: phones behind one carrier-grade NAT share an address, so one of them that keeps
failing throttles the others there too. A limit well above what a working phone needs
(it authenticates once per connection and stops after close code 4001) keeps that rare.
"""

import structlog
from redis.asyncio import Redis

from mensajero_common.keys import RedisKeys
from mensajero_common.settings import Settings
from mensajero_common.throttle import (
    FailureLimit,
    FailureThrottle,
    Throttled,
    counted_address,
    parse_limit_setting,
)

log = structlog.get_logger(__name__)

SCOPE_IP = "ip"


def auth_limit_from_settings(settings: Settings) -> FailureLimit:
    """Parse DEVICE_AUTH_FAILURES_PER_IP, or raise InvalidLimitSettingError."""
    return FailureLimit(
        SCOPE_IP,
        parse_limit_setting(
            "DEVICE_AUTH_FAILURES_PER_IP", settings.DEVICE_AUTH_FAILURES_PER_IP
        ),
    )


class DeviceAuthThrottle:
    def __init__(
        self, limit: FailureLimit, redis: Redis, settings: Settings, keys: RedisKeys
    ) -> None:
        self._throttle = FailureThrottle(
            [limit],
            redis,
            settings.REDIS_URL,
            keys.device_auth_throttle_prefix,
            name="device authentication",
        )

    async def check(self, client_address: str) -> Throttled | None:
        """Return the limit that the address has reached, or None."""
        return await self._throttle.check({SCOPE_IP: counted_address(client_address)})

    async def record_failure(self, client_address: str) -> None:
        """Count a failed authentication, and log when it makes the address throttled."""
        counted = counted_address(client_address)
        reached = await self._throttle.record_failure({SCOPE_IP: counted})
        if reached is None:
            return
        log.info(
            "client address throttled after failed authentications",
            client_address=counted,
            limit=reached.limit,
            retry_after_s=reached.retry_after_s,
        )
