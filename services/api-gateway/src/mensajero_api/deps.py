"""Dependency aliases for route signatures: `session: SessionDep`, `user: CurrentUser`, …

Every dependency is `async def`, even those that do no I/O: FastAPI runs a plain `def`
dependency in its thread pool, a cost paid on every request for nothing here.
"""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, OAuth2PasswordBearer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.apikeys.service import InvalidApiKeyError
from mensajero_api.auth import service as auth_service
from mensajero_api.auth.security import PasswordHasher
from mensajero_api.errors import request_language
from mensajero_api.ratelimits.middleware import (
    enforce_credential_failure_limit,
    enforce_revoked_token_limit,
    enforce_user_rate_limit,
)
from mensajero_api.resources import Resources
from mensajero_common.keys import RedisKeys
from mensajero_common.models import User
from mensajero_common.settings import Settings

TOKEN_URL = "/api/v1/login/access-token"

# auto_error=False lets a missing token raise our own localized 401 envelope. The scheme
# still gives Swagger UI the URL where its Authorize button gets a token.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl=TOKEN_URL, auto_error=False)
api_key_scheme = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="A user API key from POST /api/v1/users/me/api-keys.",
)


def _resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


async def get_resources(request: Request) -> Resources:
    return _resources(request)


ResourcesDep = Annotated[Resources, Depends(get_resources)]

# The dependencies below read the resources from the request instead of depending on
# get_resources. FastAPI solves a dependency's own dependencies again wherever it is
# used, before it checks its cache, so each extra level costs every request some CPU.


async def get_settings(request: Request) -> Settings:
    return _resources(request).settings


async def get_redis(request: Request) -> Redis:
    return _resources(request).redis


async def get_keys(request: Request) -> RedisKeys:
    return _resources(request).keys


async def get_passwords(request: Request) -> PasswordHasher:
    return _resources(request).passwords


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """Open one session per request; services commit it, and closing rolls back the rest."""
    async with _resources(request).session_factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
KeysDep = Annotated[RedisKeys, Depends(get_keys)]
PasswordsDep = Annotated[PasswordHasher, Depends(get_passwords)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def get_language(request: Request) -> str:
    return request_language(request)


LanguageDep = Annotated[str, Depends(get_language)]
TokenDep = Annotated[str | None, Depends(oauth2_scheme)]
ApiKeyDep = Annotated[str | None, Depends(api_key_scheme)]


async def get_current_principal(
    request: Request,
    session: SessionDep,
    token: TokenDep,
    api_key: ApiKeyDep,
) -> auth_service.Principal:
    """Authenticate the request by its bearer token or X-API-Key, or raise a 401.

    A request with an API key also counts against its owner's per-user rate limit,
    which the middleware could count only per key. A request whose API key fails, or
    whose signed token names a deleted user or predates a password change, counts
    against its address instead, and gets 429 once the address is past
    RATE_LIMIT_PER_IP in that count.
    """
    try:
        principal = await auth_service.authenticate_request(
            session, _resources(request).settings, token=token, api_key=api_key
        )
    except (InvalidApiKeyError, auth_service.DeviceKeyNotAllowedError):
        if api_key:
            await enforce_credential_failure_limit(request)
        raise
    except auth_service.InvalidTokenError:
        # The middleware counted the signed token against its user. A revoked token
        # must not use up the limit that the user's current token and API keys share.
        await enforce_revoked_token_limit(request)
        raise
    if principal.api_key_id is not None:
        await enforce_user_rate_limit(request, principal.user.id)
    return principal


CurrentPrincipal = Annotated[auth_service.Principal, Depends(get_current_principal)]


async def get_current_user(principal: CurrentPrincipal) -> User:
    return principal.user


CurrentUser = Annotated[User, Depends(get_current_user)]


async def get_login_user(principal: CurrentPrincipal) -> User:
    """Return the user of a request authenticated by a login token, or raise a 403.

    For the operations that would let a leaked API key outlive its revocation or lock
    its owner out: creating API keys and changing the password.
    """
    if principal.api_key_id is not None:
        raise auth_service.LoginTokenRequiredError()
    return principal.user


LoginUser = Annotated[User, Depends(get_login_user)]
