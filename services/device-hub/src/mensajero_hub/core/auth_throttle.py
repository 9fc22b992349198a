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

import ipaddress

import structlog
from redis.asyncio import Redis

from mensajero_common.keys import RedisKeys
from mensajero_common.settings import Settings
from mensajero_common.throttle import (
    FailureLimit,
    FailureThrottle,
    Throttled,
    parse_limit_setting,
)

log = structlog.get_logger(__name__)

SCOPE_IP = "ip"
# Length of the IPv6 prefix counted as one client. A /64 is one IPv6 subnet, in which a
# host picks addresses of its own (SLAAC, temporary privacy addresses), so counting single
# addresses would let one host move past the limit.
IPV6_CLIENT_PREFIX_LENGTH = 64


def auth_limit_from_settings(settings: Settings) -> FailureLimit:
    """Parse DEVICE_AUTH_FAILURES_PER_IP, or raise InvalidLimitSettingError."""
    return FailureLimit(
        SCOPE_IP,
        parse_limit_setting(
            "DEVICE_AUTH_FAILURES_PER_IP", settings.DEVICE_AUTH_FAILURES_PER_IP
        ),
    )


def counted_address(address: str) -> str:
    """Return what the throttle counts for a client address.

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
