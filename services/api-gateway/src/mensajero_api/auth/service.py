"""Login with email and password, and the user behind a bearer token."""

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.auth.security import (
    PasswordHasher,
    TokenDecodeError,
    decode_access_token,
)
from mensajero_api.types import is_storable
from mensajero_api.users import repository as users_repository
from mensajero_common.errors import AuthenticationError, PermissionDeniedError
from mensajero_common.models import User
from mensajero_common.settings import Settings

logger = structlog.get_logger(__name__)


class NotAuthenticatedError(AuthenticationError):
    code = "not_authenticated"

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": "Bearer"})


class InvalidTokenError(AuthenticationError):
    code = "invalid_token"

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class InvalidCredentialsError(AuthenticationError):
    code = "invalid_credentials"

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": "Bearer"})


class InactiveUserError(PermissionDeniedError):
    code = "inactive_user"


async def authenticate(
    session: AsyncSession, passwords: PasswordHasher, email: str, password: str
) -> User:
    """Return the active user with this email and password, or raise."""
    if not (is_storable(email) and is_storable(password)):
        raise InvalidCredentialsError()

    user = await users_repository.get_user_by_email(session, email)
    if user is None:
        await passwords.verify_dummy(password)
        raise InvalidCredentialsError()
    if not await passwords.verify(password, user.hashed_password):
        logger.info("login rejected: wrong password", user_id=str(user.id))
        raise InvalidCredentialsError()
    if not user.is_active:
        raise InactiveUserError()
    return user


async def get_user_for_token(
    session: AsyncSession, settings: Settings, token: str | None
) -> User:
    """Return the active user that `token` names, or raise a 401 (403 if disabled)."""
    if not token:
        raise NotAuthenticatedError()

    try:
        claims = decode_access_token(token, settings)
    except TokenDecodeError as error:
        logger.debug("bearer token rejected", reason=str(error))
        raise InvalidTokenError() from None

    user = await users_repository.get_user(session, claims.user_id)
    # A deleted user, or a token issued before the user's token_version was bumped.
    if user is None or user.token_version != claims.token_version:
        raise InvalidTokenError()
    if not user.is_active:
        raise InactiveUserError()
    return user
