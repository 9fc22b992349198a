"""Throttling of failed password checks, per account and per client address, in Redis.

Only failures count: a login with a wrong password, or a password change with a wrong
current password. Past LOGIN_FAILURES_PER_ACCOUNT or LOGIN_FAILURES_PER_IP the API returns
429 `too_many_login_attempts` before it checks the password at all, so a guessing run costs
no argon2 work once throttled. The account is the email as the caller normalized it,
hashed, so an unknown email is throttled like a known one and the response reveals
nothing about which exist.
mensajero_common.throttle does the counting, and fails open while Redis fails.
"""

import hashlib
import unicodedata
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request

from mensajero_api.deps import ResourcesDep
from mensajero_api.resources import Resources
from mensajero_common.errors import AppError
from mensajero_common.settings import Settings
from mensajero_common.throttle import (
    FailureLimit,
    FailureThrottle,
    counted_address,
    parse_limit_setting,
)

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
    per_account: FailureLimit
    per_ip: FailureLimit

    @classmethod
    def from_settings(cls, settings: Settings) -> "LoginThrottleRules":
        """Parse the LOGIN_FAILURES_* settings, or raise InvalidLimitSettingError."""
        return cls(
            per_account=FailureLimit(
                SCOPE_ACCOUNT,
                parse_limit_setting(
                    "LOGIN_FAILURES_PER_ACCOUNT", settings.LOGIN_FAILURES_PER_ACCOUNT
                ),
            ),
            per_ip=FailureLimit(
                SCOPE_IP,
                parse_limit_setting(
                    "LOGIN_FAILURES_PER_IP", settings.LOGIN_FAILURES_PER_IP
                ),
            ),
        )


def _account_id(email: str) -> str:
    # Hashed so that Redis key names carry no email addresses. NFKC folds look-alike
    # spellings ("ｋ" and "k") into one account, as sign-up does, and also addresses
    # that sign-up rejects or that were stored before it applied NFKC.
    folded = unicodedata.normalize("NFKC", email.strip()).casefold()
    return hashlib.sha256(folded.encode()).hexdigest()[:32]


class LoginThrottle:
    def __init__(self, rules: LoginThrottleRules, resources: Resources) -> None:
        self.resources = resources
        self._throttle = FailureThrottle(
            [rules.per_account, rules.per_ip],
            resources.redis,
            resources.settings.REDIS_URL,
            resources.keys.login_throttle_prefix,
            name="login",
        )

    async def check(self, email: str, ip: str) -> None:
        """Raise TooManyLoginAttemptsError if the account or the address is throttled.

        While Redis fails, attempts pass: logins keep working, unthrottled.
        """
        throttled = await self._throttle.check(
            {SCOPE_ACCOUNT: _account_id(email), SCOPE_IP: counted_address(ip)}
        )
        if throttled is None:
            return
        logger.info(
            "login throttled",
            scope=throttled.scope,
            limit=throttled.limit,
            retry_after_s=throttled.retry_after_s,
        )
        raise TooManyLoginAttemptsError(throttled.retry_after_s)

    async def record_failure(self, email: str, ip: str) -> None:
        await self._throttle.record_failure(
            {SCOPE_ACCOUNT: _account_id(email), SCOPE_IP: counted_address(ip)}
        )

    async def clear_account(self, email: str) -> None:
        """Forget the account's failures after a correct password; the address keeps its."""
        await self._throttle.clear(SCOPE_ACCOUNT, _account_id(email))


async def get_login_throttle(
    request: Request, resources: ResourcesDep
) -> LoginThrottle:
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
