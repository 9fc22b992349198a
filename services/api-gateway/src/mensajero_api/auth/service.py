"""Login with email and password, and the user behind a request's credentials.

A request authenticates with a bearer token (`Authorization: Bearer <JWT>`), a user API
key (`X-API-Key`), or both when they name the same user. A device API key is rejected in
either place, so a phone's key can never read the REST API.
"""

import uuid
from dataclasses import dataclass

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.apikeys import service as apikeys_service
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


class UserApiKeyAsTokenError(AuthenticationError):
    """A user API key sent as the bearer token, with a message that names X-API-Key."""

    code = "invalid_token"

    def __init__(self) -> None:
        super().__init__(
            message_key="user_api_key_as_token",
            details={"reason": "user_api_key"},
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


class InvalidCredentialsError(AuthenticationError):
    code = "invalid_credentials"

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": "Bearer"})


class InactiveUserError(PermissionDeniedError):
    code = "inactive_user"


class DeviceKeyNotAllowedError(AuthenticationError):
    code = "device_key_not_allowed"

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": "Bearer"})


class CredentialsMismatchError(AuthenticationError):
    code = "credentials_mismatch"

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": "Bearer"})


class LoginTokenRequiredError(PermissionDeniedError):
    code = "login_token_required"


@dataclass(frozen=True)
class Principal:
    """The sender of a request: its user, and the user API key that authenticated it, if any."""

    user: User
    api_key_id: uuid.UUID | None = None


async def authenticate(
    session: AsyncSession,
    passwords: PasswordHasher,
    email: str,
    password: str,
    email_before_nfkc: str | None = None,
) -> User:
    """Return the active user with this email and password, or raise.

    `email_before_nfkc` finds an account whose address predates NFKC, as
    get_user_by_email describes.
    """
    if not (is_storable(email) and is_storable(password)):
        raise InvalidCredentialsError()

    user = await users_repository.get_user_by_email(session, email, email_before_nfkc)
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
    if token.startswith(settings.DEVICE_API_KEY_PREFIX):
        raise DeviceKeyNotAllowedError()
    if token.startswith(settings.USER_API_KEY_PREFIX):
        raise UserApiKeyAsTokenError()

    try:
        claims = decode_access_token(token, settings)
    except TokenDecodeError as error:
        logger.debug("bearer token rejected", reason=str(error))
        raise InvalidTokenError() from None

    user = await users_repository.get_request_user(session, claims.user_id)
    # A deleted user, or a token issued before the user's token_version was bumped.
    if user is None or user.token_version != claims.token_version:
        raise InvalidTokenError()
    if not user.is_active:
        raise InactiveUserError()
    return user


async def get_user_for_api_key(
    session: AsyncSession, settings: Settings, api_key: str
) -> Principal:
    """Return the active user of a user API key, or raise a 401 (403 if disabled)."""
    if api_key.startswith(settings.DEVICE_API_KEY_PREFIX):
        raise DeviceKeyNotAllowedError()

    key, user = await apikeys_service.find_usable_key(session, settings, api_key)
    if not user.is_active:
        raise InactiveUserError()
    return Principal(user=user, api_key_id=key.id)


async def authenticate_request(
    session: AsyncSession,
    settings: Settings,
    *,
    token: str | None,
    api_key: str | None,
) -> Principal:
    """Return who sent the request, checking every credential it carries, or raise."""
    if not token and not api_key:
        raise NotAuthenticatedError()

    key_principal = None
    if api_key:
        key_principal = await get_user_for_api_key(session, settings, api_key)
        if not token:
            return key_principal

    user = await get_user_for_token(session, settings, token)
    if key_principal is None:
        return Principal(user=user)
    if key_principal.user.id != user.id:
        raise CredentialsMismatchError()
    return key_principal
