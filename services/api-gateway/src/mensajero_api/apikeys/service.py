"""Creating, listing and revoking user API keys, and finding the key of a request.

A user API key is shown once and stored only as a SHA-256 hash with its first characters.
Each request looks the key up in Postgres, so a revoked or expired key fails on the very
next request.
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.apikeys import repository
from mensajero_api.apikeys.schemas import ApiKeyCreate
from mensajero_api.pagination import Listing, decode_cursor, split_page
from mensajero_api.users import repository as users_repository
from mensajero_common import apikeys
from mensajero_common.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
)
from mensajero_common.models import User, UserApiKey
from mensajero_common.settings import Settings

logger = structlog.get_logger(__name__)

# Usable (neither revoked nor expired) keys a user may hold at once.
MAX_ACTIVE_KEYS_PER_USER = 50
# Maximum length of a key value: a prefix of a few characters plus 43 random ones.
# Anything longer is rejected before hashing.
MAX_KEY_LENGTH = 128
# last_used_at is written at most this often per key, so that a busy key costs no write
# per request.
LAST_USED_RESOLUTION = timedelta(minutes=5)


class ApiKeyNotFoundError(NotFoundError):
    """The key does not exist or belongs to another user (404, so ids don't leak)."""

    code = "api_key_not_found"

    def __init__(self, key_id: uuid.UUID) -> None:
        super().__init__(key_id=str(key_id), details={"key_id": str(key_id)})


class ApiKeyLimitError(ConflictError):
    code = "api_key_limit_reached"

    def __init__(self) -> None:
        super().__init__(
            limit=MAX_ACTIVE_KEYS_PER_USER,
            details={"limit": MAX_ACTIVE_KEYS_PER_USER},
        )


class InvalidApiKeyError(AuthenticationError):
    """The X-API-Key is unknown, revoked or expired, as `reason` tells."""

    code = "invalid_api_key"

    def __init__(self, reason: str) -> None:
        super().__init__(
            message_key="invalid_user_api_key",
            reason=reason,
            details={"reason": reason},
            headers={"WWW-Authenticate": 'APIKey header="X-API-Key"'},
        )


async def create_api_key(
    session: AsyncSession, settings: Settings, user: User, data: ApiKeyCreate
) -> tuple[UserApiKey, str]:
    """Create a key within the per-user limit and commit; return it and its value."""
    # Without the lock, parallel creates would each count the same keys and insert past
    # the limit.
    await users_repository.lock_user(session, user.id)
    now = datetime.now(UTC)
    if await repository.count_usable_api_keys(session, user.id, now) >= (
        MAX_ACTIVE_KEYS_PER_USER
    ):
        await session.rollback()
        raise ApiKeyLimitError()

    expires_at = None
    if data.expires_in_days is not None:
        expires_at = now + timedelta(days=data.expires_in_days)
    value = apikeys.generate_api_key(settings.USER_API_KEY_PREFIX)
    api_key = await repository.insert_api_key(
        session,
        user_id=user.id,
        name=data.name,
        key_hash=apikeys.hash_api_key(value),
        key_prefix=apikeys.display_prefix(value),
        expires_at=expires_at,
    )
    await session.commit()

    logger.info("api key created", user_id=str(user.id), api_key_id=str(api_key.id))
    return api_key, value


async def list_api_keys(
    session: AsyncSession, user: User, *, limit: int, cursor: str | None
) -> tuple[Sequence[UserApiKey], str | None]:
    """Return a page of the user's keys, oldest first, and the cursor of the next page.

    Revoked and expired keys stay listed, so the listing has no other bound.
    """
    after = decode_cursor(cursor, "asc", Listing.API_KEYS) if cursor else None
    api_keys = await repository.list_api_keys(
        session, user.id, limit=limit + 1, after=after
    )
    return split_page(api_keys, limit, "asc", Listing.API_KEYS)


async def get_api_key(
    session: AsyncSession, user: User, key_id: uuid.UUID, *, for_update: bool = False
) -> UserApiKey:
    api_key = await repository.get_api_key(
        session, user.id, key_id, for_update=for_update
    )
    if api_key is None:
        raise ApiKeyNotFoundError(key_id)
    return api_key


async def revoke_api_key(
    session: AsyncSession, user: User, key_id: uuid.UUID
) -> UserApiKey:
    """Revoke the key and commit; revoking it again keeps the first revocation time.

    The row is locked before revoked_at is read, so that of concurrent revocations only
    the first one writes it.
    """
    api_key = await get_api_key(session, user, key_id, for_update=True)
    if api_key.revoked_at is None:
        api_key.revoked_at = datetime.now(UTC)
        await session.commit()
        logger.info("api key revoked", user_id=str(user.id), api_key_id=str(key_id))
    return api_key


async def find_usable_key(
    session: AsyncSession, settings: Settings, value: str
) -> tuple[UserApiKey, User]:
    """Return the key named by an X-API-Key value and its owner, or raise InvalidApiKeyError.

    The owner may be disabled; the caller decides what that means.
    """
    if len(value) > MAX_KEY_LENGTH or not value.startswith(
        settings.USER_API_KEY_PREFIX
    ):
        raise InvalidApiKeyError("unknown")

    found = await repository.find_by_hash(session, apikeys.hash_api_key(value))
    if found is None:
        raise InvalidApiKeyError("unknown")
    api_key, user = found
    now = datetime.now(UTC)
    if api_key.revoked_at is not None:
        raise InvalidApiKeyError("revoked")
    if api_key.expires_at is not None and api_key.expires_at <= now:
        raise InvalidApiKeyError("expired")

    if api_key.last_used_at is None or (
        now - api_key.last_used_at >= LAST_USED_RESOLUTION
    ):
        api_key.last_used_at = now
        # Committed now, before the route runs: a route that only reads never commits,
        # and closing its session would roll the write back.
        await session.commit()
    return api_key, user
