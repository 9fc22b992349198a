"""Counting requests against the rate limits, in Redis.

The counters are moving windows, as in the moving-window strategy of the `limits`
package (see mensajero_api.ratelimits.windows): a list of request timestamps per client
and item, trimmed to the item's count. Unlike fixed windows, they let no burst through
at the edge of two windows, and they give the exact time at which the oldest request
leaves the window, which is the Retry-After of a rejection.
"""

import math
import time
import uuid

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import Scope

from mensajero_api.ratelimits.identity import (
    KIND_API_KEY,
    KIND_USER,
    ClientKey,
    identify_client,
)
from mensajero_api.ratelimits.rules import RateLimitRule, RateLimitRules
from mensajero_api.ratelimits.windows import FullWindow, MovingWindows, Window
from mensajero_common.errors import AppError
from mensajero_common.keys import RedisKeys
from mensajero_common.settings import Settings
from mensajero_common.throttle import client_address, counted_address, describe_item

logger = structlog.get_logger(__name__)

# Paths of the login and sign-up endpoints, limited per IP address by their own rule.
LOGIN_PATHS = frozenset({"/api/v1/login/access-token", "/api/v1/users/signup"})
# While Redis fails, one error log per this many seconds instead of one per request.
REDIS_ERROR_LOG_INTERVAL_S = 60.0
# Addresses whose failed API keys a process remembers at most (see RequestRateLimiter).
MAX_FAILING_ADDRESSES = 10_000
# Owners of API keys that a process remembers at most (see RequestRateLimiter).
MAX_KEY_OWNERS = 10_000
# Scope keys that check() sets for enforce_user_rate_limit and record_credential_failure:
# the digest of the request's API key, the user whose windows it has counted the request
# in, and the Unix time at which it counted it there.
API_KEY_DIGEST_SCOPE_KEY = "mensajero.api_key_digest"
COUNTED_USER_SCOPE_KEY = "mensajero.rate_limited_user"
COUNTED_AT_SCOPE_KEY = "mensajero.rate_limited_at"


class RateLimitedError(AppError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, limit: str, retry_after_s: int) -> None:
        super().__init__(
            limit=limit,
            retry_after=retry_after_s,
            details={"limit": limit, "retry_after": retry_after_s},
            headers={"Retry-After": str(retry_after_s)},
        )


class RequestRateLimiter:
    """Check each API request against the rules that apply to its client."""

    def __init__(
        self, rules: RateLimitRules, settings: Settings, redis: Redis, keys: RedisKeys
    ) -> None:
        self.rules = rules
        self.settings = settings
        self._windows = MovingWindows(redis, keys.rate_limit_prefix)
        self._last_error_log = -math.inf
        # Addresses with a failed API key in this process, each with the monotonic time
        # at which its last failure leaves the longest window of the failure count.
        # Only their requests with an API key are tested against that count, so other
        # clients' requests pay no Redis call for it. An address whose failures are
        # spread over several API processes is refused by each once it failed there.
        self._failing_addresses: dict[str, float] = {}
        self._failure_window_s = max(
            item.get_expiry() for item in rules.api_key_failures_per_ip.items
        )
        # The owner's user id of each API key digest that authenticated in this
        # process. A key never changes owner, so a request with a known key is counted
        # per key and per user in one Redis call. A key that fails authentication is
        # forgotten, and the failed request is taken out of its owner's windows again.
        self._key_owners: dict[str, str] = {}

    def _checks(
        self, scope: Scope, client: ClientKey
    ) -> list[tuple[RateLimitRule, str]]:
        checks = []
        if scope.get("method") == "POST" and scope.get("path") in LOGIN_PATHS:
            address = counted_address(client_address(scope))
            checks.append((self.rules.login_per_ip, address))
        checks.append((self._rule_for(client), client.value))
        return checks

    def _rule_for(self, client: ClientKey) -> RateLimitRule:
        if client.kind == KIND_USER:
            return self.rules.per_user
        if client.kind == KIND_API_KEY:
            return self.rules.per_api_key
        return self.rules.per_ip

    async def check(self, scope: Scope) -> RateLimitedError | None:
        """Count the request; return the error to respond with if a limit is reached.

        A request rejected by one item is counted by none, and all its items take one
        Redis call. While Redis is unreachable every request passes, because the limits
        protect the API and rejecting everything would take it down instead.

        A request with an API key is rejected, without being counted, while its address
        is past the limit of failed credentials that record_credential_failure counts. Only an
        address that failed in this process lately is tested.
        """
        client = identify_client(scope, self.settings)
        checks = self._checks(scope, client)
        if client.kind == KIND_USER:
            return await self._check_token_user(scope, checks, client.value)
        if client.kind == KIND_API_KEY:
            address = counted_address(client_address(scope))
            if self._failed_lately(address):
                rejection = await self._test_api_key_failures(address)
                if rejection is not None:
                    return rejection
            scope[API_KEY_DIGEST_SCOPE_KEY] = client.value
            owner = self._key_owners.get(client.value)
            if owner is not None:
                return await self._check_known_key(scope, checks, owner)
        return await self._hit_all(checks)

    async def _check_token_user(
        self, scope: Scope, checks: list[tuple[RateLimitRule, str]], user_id: str
    ) -> RateLimitedError | None:
        """Count a request with a signed bearer token against the token's user.

        Records the user and the time in `scope`, so that record_credential_failure
        can take the request out of the user's windows again when authentication
        rejects the token.
        """
        at = time.time()
        try:
            full = await self._windows.acquire(self._windows_of(checks), at=at)
        except (RedisError, OSError) as error:
            self._log_redis_error(error)
            return None
        if full is not None:
            return self._rejection(full)
        scope[COUNTED_USER_SCOPE_KEY] = user_id
        scope[COUNTED_AT_SCOPE_KEY] = at
        return None

    async def _check_known_key(
        self, scope: Scope, checks: list[tuple[RateLimitRule, str]], owner: str
    ) -> RateLimitedError | None:
        """Count a request with a known API key per key and per user in one call.

        When the owner's limit is full, the request is counted per key alone, as with a
        new key, so that authentication runs first: a revoked key still gets 401, and
        enforce_user_rate_limit rejects a valid one.
        """
        user_windows = self._windows_of([(self.rules.per_user, owner)])
        at = time.time()
        try:
            full = await self._windows.acquire(
                self._windows_of(checks) + user_windows, at=at
            )
        except (RedisError, OSError) as error:
            self._log_redis_error(error)
            return None
        if full is None:
            scope[COUNTED_USER_SCOPE_KEY] = owner
            scope[COUNTED_AT_SCOPE_KEY] = at
            return None
        if full.window in user_windows:
            return await self._hit_all(checks)
        return self._rejection(full)

    async def record_credential_failure(self, scope: Scope) -> RateLimitedError | None:
        """Count a request whose credential failed authentication against its address.

        The credential is an X-API-Key, or a bearer token with a valid signature that
        names a deleted user or was revoked by a password change. The middleware counts
        a request with an API key per key, so a client that sent a new made-up key with
        each request would escape RATE_LIMIT_PER_IP. It counts a token against the user
        it names, so a revoked token would use up the limit of its user's current token
        and API keys. Returns the error to respond with once the address is past
        RATE_LIMIT_PER_IP in this count.
        """
        address = counted_address(client_address(scope))
        self._remember_failure(address)
        digest = scope.get(API_KEY_DIGEST_SCOPE_KEY)
        if digest is not None:
            self._key_owners.pop(digest, None)
        owner = scope.get(COUNTED_USER_SCOPE_KEY)
        if owner is not None:
            # The key was known or the token signed, so the middleware counted the
            # request against its user. A revoked credential must not use up that
            # user's limit.
            await self._release_user(owner, scope[COUNTED_AT_SCOPE_KEY])
        return await self._hit_all([(self.rules.api_key_failures_per_ip, address)])

    async def _release_user(self, owner: str, at: float) -> None:
        try:
            await self._windows.release(
                self._windows_of([(self.rules.per_user, owner)]), at
            )
        except (RedisError, OSError) as error:
            self._log_redis_error(error)

    def _remember_failure(self, address: str) -> None:
        now = time.monotonic()
        # Moved to the end, so the oldest failures come first.
        self._failing_addresses.pop(address, None)
        self._failing_addresses[address] = now + self._failure_window_s
        if len(self._failing_addresses) <= MAX_FAILING_ADDRESSES:
            return
        self._failing_addresses = {
            failing: until
            for failing, until in self._failing_addresses.items()
            if until > now
        }
        while len(self._failing_addresses) > MAX_FAILING_ADDRESSES:
            del self._failing_addresses[next(iter(self._failing_addresses))]

    def _failed_lately(self, address: str) -> bool:
        until = self._failing_addresses.get(address)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._failing_addresses[address]
        return False

    async def _test_api_key_failures(self, address: str) -> RateLimitedError | None:
        checks = [(self.rules.api_key_failures_per_ip, address)]
        return await self._acquire(checks, record=False)

    async def check_user(
        self, user_id: uuid.UUID, api_key_digest: str | None = None
    ) -> RateLimitedError | None:
        """Count one request against the per-user limit of `user_id`.

        The middleware counts a request with a new API key per key only, because it
        cannot find the key's owner without a query. Authentication by API key calls
        this once it has found the owner, so that all of a user's keys share
        RATE_LIMIT_PER_USER. It passes the key's digest, and the limiter keeps the owner.
        """
        if api_key_digest is not None:
            self._remember_owner(api_key_digest, str(user_id))
        return await self._hit_all([(self.rules.per_user, str(user_id))])

    def _remember_owner(self, digest: str, user_id: str) -> None:
        self._key_owners[digest] = user_id
        if len(self._key_owners) > MAX_KEY_OWNERS:
            # The oldest entry is dropped: a dict keeps the order of insertion.
            del self._key_owners[next(iter(self._key_owners))]

    async def _hit_all(
        self, checks: list[tuple[RateLimitRule, str]]
    ) -> RateLimitedError | None:
        return await self._acquire(checks, record=True)

    @staticmethod
    def _windows_of(checks: list[tuple[RateLimitRule, str]]) -> list[Window]:
        return [
            Window(item, rule.name, identifier)
            for rule, identifier in checks
            for item in rule.items
        ]

    async def _acquire(
        self, checks: list[tuple[RateLimitRule, str]], *, record: bool
    ) -> RateLimitedError | None:
        try:
            full = await self._windows.acquire(self._windows_of(checks), record=record)
        except (RedisError, OSError) as error:
            self._log_redis_error(error)
            return None
        return None if full is None else self._rejection(full)

    def _rejection(self, full: FullWindow) -> RateLimitedError:
        window = full.window
        retry_after_s = max(math.ceil(full.frees_at - time.time()), 1)
        logger.info(
            "request rate limited",
            rule=window.namespace,
            client=window.identifier,
            limit=describe_item(window.item),
            retry_after_s=retry_after_s,
        )
        return RateLimitedError(describe_item(window.item), retry_after_s)

    def _log_redis_error(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log < REDIS_ERROR_LOG_INTERVAL_S:
            return
        self._last_error_log = now
        logger.error(
            "rate limits not enforced: Redis failed",
            error=repr(error),
            silent_for_s=REDIS_ERROR_LOG_INTERVAL_S,
        )
