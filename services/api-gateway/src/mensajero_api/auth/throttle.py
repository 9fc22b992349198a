"""Throttling of failed password checks, per account and per client address, in Redis.

Only failures count: a login with a wrong password, or a password change with a wrong
current password. Past LOGIN_FAILURES_PER_ACCOUNT or LOGIN_FAILURES_PER_IP the API returns
429 `too_many_login_attempts` before it checks the password at all, so a guessing run costs
no argon2 work once throttled. The account is the email as typed, hashed, so an unknown
email is throttled like a known one and the answer tells nothing about which exist.
"""

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request
from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from redis.exceptions import RedisError

from mensajero_api.deps import ResourcesDep
from mensajero_api.resources import Resources
from mensajero_common.errors import AppError
from mensajero_common.settings import Settings

logger = structlog.get_logger(__name__)

# App state attributes: the parsed rules (set by create_app, so a malformed setting stops
# the start) and the throttle, made on first use from the lifespan's Redis client.
RULES_STATE_ATTRIBUTE = "login_throttle_rules"
THROTTLE_STATE_ATTRIBUTE = "login_throttle"

SCOPE_ACCOUNT = "account"
SCOPE_IP = "ip"


class TooManyLoginAttemptsError(AppError):
    status_code = 429
    code = "too_many_login_attempts"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            retry_after=retry_after_s,
            details={"retry_after": retry_after_s},
            headers={"Retry-After": str(retry_after_s)},
        )


@dataclass(frozen=True)
class LoginThrottleRules:
    per_account: list[RateLimitItem]
    per_ip: list[RateLimitItem]

    @classmethod
    def from_settings(cls, settings: Settings) -> "LoginThrottleRules":
        """Parse the LOGIN_FAILURES_* settings, or raise ValueError naming the bad one."""
        items = {}
        for name in ("LOGIN_FAILURES_PER_ACCOUNT", "LOGIN_FAILURES_PER_IP"):
            value = getattr(settings, name)
            try:
                items[name] = parse_many(value)
            except ValueError:
                raise ValueError(
                    f"invalid setting {name}: {value!r}; expected items such as "
                    '"5/minute;20/hour"'
                ) from None
        return cls(
            per_account=items["LOGIN_FAILURES_PER_ACCOUNT"],
            per_ip=items["LOGIN_FAILURES_PER_IP"],
        )


def _account_id(email: str) -> str:
    # Hashed so that Redis key names carry no email addresses.
    return hashlib.sha256(email.strip().casefold().encode()).hexdigest()[:32]


def client_address(request: Request) -> str:
    """Return the client's address as uvicorn reports it (see FORWARDED_ALLOW_IPS)."""
    return request.client.host if request.client else "unknown"


class LoginThrottle:
    def __init__(self, rules: LoginThrottleRules, resources: Resources) -> None:
        self._rules = rules
        self.resources = resources
        # Shares the API's connection pool, so closing the API's client closes it too.
        storage = RedisStorage(
            "async+" + resources.settings.REDIS_URL,
            implementation="redispy",
            key_prefix=resources.keys.login_throttle_prefix,
            # The stubs of `limits` type options as scalars; redis-py takes the pool.
            connection_pool=resources.redis.connection_pool,  # type: ignore[arg-type]
        )
        self._limiter = MovingWindowRateLimiter(storage)

    def _counters(self, email: str, ip: str) -> list[tuple[RateLimitItem, str, str]]:
        account = _account_id(email)
        return [
            *((item, SCOPE_ACCOUNT, account) for item in self._rules.per_account),
            *((item, SCOPE_IP, ip) for item in self._rules.per_ip),
        ]

    async def check(self, email: str, ip: str) -> None:
        """Raise TooManyLoginAttemptsError if the account or the address is throttled.

        While Redis fails, attempts pass: logins keep working, unthrottled, and each
        failure is logged.
        """
        try:
            for item, scope, identifier in self._counters(email, ip):
                if await self._limiter.test(item, scope, identifier):
                    continue
                stats = await self._limiter.get_window_stats(item, scope, identifier)
                retry_after_s = max(math.ceil(stats.reset_time - time.time()), 1)
                logger.info(
                    "login throttled",
                    scope=scope,
                    limit=str(item),
                    retry_after_s=retry_after_s,
                )
                raise TooManyLoginAttemptsError(retry_after_s)
        except (RedisError, StorageError, OSError) as error:
            logger.error("login throttle not enforced: Redis failed", error=repr(error))

    async def record_failure(self, email: str, ip: str) -> None:
        try:
            for item, scope, identifier in self._counters(email, ip):
                await self._limiter.hit(item, scope, identifier)
        except (RedisError, StorageError, OSError) as error:
            logger.error("failed login not counted: Redis failed", error=repr(error))

    async def clear_account(self, email: str) -> None:
        """Forget the account's failures after a correct password; the address keeps its."""
        account = _account_id(email)
        try:
            for item in self._rules.per_account:
                await self._limiter.clear(item, SCOPE_ACCOUNT, account)
        except (RedisError, StorageError, OSError) as error:
            logger.error("clearing failed logins failed", error=repr(error))


def get_login_throttle(request: Request, resources: ResourcesDep) -> LoginThrottle:
    state = request.app.state
    throttle: LoginThrottle | None = getattr(state, THROTTLE_STATE_ATTRIBUTE, None)
    # A new lifespan (tests restart apps) opens a new Redis client, so the throttle follows.
    if throttle is None or throttle.resources is not resources:
        rules = getattr(state, RULES_STATE_ATTRIBUTE, None) or (
            LoginThrottleRules.from_settings(resources.settings)
        )
        throttle = LoginThrottle(rules, resources)
        setattr(state, THROTTLE_STATE_ATTRIBUTE, throttle)
    return throttle


LoginThrottleDep = Annotated[LoginThrottle, Depends(get_login_throttle)]
