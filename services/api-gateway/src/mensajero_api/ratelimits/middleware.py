"""The ASGI middleware that applies the rate limits to every /api/ request."""

import uuid

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from mensajero_api.errors import handle_app_error
from mensajero_api.ratelimits.limiter import (
    API_KEY_DIGEST_SCOPE_KEY,
    COUNTED_USER_SCOPE_KEY,
    RequestRateLimiter,
)

# The attribute of `app.state` that stores the app's RequestRateLimiter. The lifespan sets it
# once Redis is open; without it (RATE_LIMIT_ENABLED=false) requests pass unchecked.
STATE_ATTRIBUTE = "rate_limiter"
API_PATH_PREFIX = "/api/"


class RateLimitMiddleware:
    """Respond with 429 `rate_limited` and Retry-After before the request body is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PATH_PREFIX):
            await self.app(scope, receive, send)
            return

        limiter: RequestRateLimiter | None = getattr(
            scope["app"].state, STATE_ATTRIBUTE, None
        )
        rejection = await limiter.check(scope) if limiter is not None else None
        if rejection is None:
            await self.app(scope, receive, send)
            return

        response = await handle_app_error(Request(scope), rejection)
        await response(scope, receive, send)


async def enforce_user_rate_limit(request: Request, user_id: uuid.UUID) -> None:
    """Count the request against `user_id`'s per-user limit, or raise RateLimitedError."""
    limiter: RequestRateLimiter | None = getattr(
        request.app.state, STATE_ATTRIBUTE, None
    )
    if limiter is None:
        return
    scope = request.scope
    if scope.get(COUNTED_USER_SCOPE_KEY) == str(user_id):
        # The middleware knew the key's owner and has counted the request already.
        return
    rejection = await limiter.check_user(user_id, scope.get(API_KEY_DIGEST_SCOPE_KEY))
    if rejection is not None:
        raise rejection


async def enforce_credential_failure_limit(request: Request) -> None:
    """Count a failed X-API-Key or bearer token against the client's address, or raise
    RateLimitedError."""
    limiter: RequestRateLimiter | None = getattr(
        request.app.state, STATE_ATTRIBUTE, None
    )
    if limiter is None:
        return
    rejection = await limiter.record_credential_failure(request.scope)
    if rejection is not None:
        raise rejection


async def enforce_revoked_token_limit(request: Request) -> None:
    """Count a signed bearer token that authentication rejected against the client's
    address, or raise RateLimitedError.

    Such a token names a deleted user or predates a password change. Only a token that
    check() counted against its user is counted here, because check() counts a token
    with a bad signature or past its expiry per address already.
    """
    if request.scope.get(COUNTED_USER_SCOPE_KEY) is None:
        return
    await enforce_credential_failure_limit(request)
