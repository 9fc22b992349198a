"""Password hashing (argon2id through pwdlib) and access tokens (HS256 JWT through PyJWT)."""

import asyncio
import functools
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt
import structlog
from pwdlib import PasswordHash
from pwdlib.exceptions import UnknownHashError
from pwdlib.hashers.argon2 import Argon2Hasher

from mensajero_common.settings import Settings

logger = structlog.get_logger(__name__)

JWT_ALGORITHM = "HS256"


class PasswordHasher:
    """Hash and verify passwords in worker threads, a bounded number at a time.

    pwdlib's argon2id defaults (argon2-cffi's RFC 9106 low-memory profile: 64 MiB, 3 passes,
    4 lanes) take about 0.1 s of CPU per call, so hashing runs off the event loop. The
    semaphore keeps a burst of logins from taking 64 MiB per request all at once.
    """

    def __init__(self, max_concurrent: int | None = None) -> None:
        self._password_hash = PasswordHash((Argon2Hasher(),))
        self._slots = asyncio.Semaphore(max_concurrent or os.cpu_count() or 1)
        self._dummy_hash: str | None = None

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._password_hash.hash, password)

    async def verify(self, password: str, hashed_password: str) -> bool:
        async with self._slots:
            try:
                return await asyncio.to_thread(
                    self._password_hash.verify, password, hashed_password
                )
            except UnknownHashError:
                logger.error("stored password hash has an unknown format")
                return False

    async def verify_dummy(self, password: str) -> None:
        """Spend the time of one verification, so that an unknown email takes as long as a known one."""
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash(secrets.token_urlsafe(16))
        await self.verify(password, self._dummy_hash)


@dataclass(frozen=True)
class AccessToken:
    token: str
    expires_in_s: int


@dataclass(frozen=True)
class TokenClaims:
    user_id: uuid.UUID
    # The user's token_version when the token was issued; a newer one on the user revokes it.
    token_version: int


class TokenDecodeError(ValueError):
    """The token is malformed, forged, expired or lacks a claim we need."""


def create_access_token(
    user_id: uuid.UUID,
    token_version: int,
    settings: Settings,
    now: datetime | None = None,
) -> AccessToken:
    issued_at = now or datetime.now(UTC)
    lifetime = timedelta(minutes=settings.ACCESS_TOKEN_EXPIRE_MINUTES)
    claims = {
        "sub": str(user_id),
        "ver": token_version,
        "iat": issued_at,
        "exp": issued_at + lifetime,
    }
    token = jwt.encode(claims, settings.SECRET_KEY, algorithm=JWT_ALGORITHM)
    return AccessToken(token=token, expires_in_s=int(lifetime.total_seconds()))


def decode_access_token(token: str, settings: Settings) -> TokenClaims:
    """Verify the signature and expiry of `token` and return its claims."""
    claims, expires_at = _verified_claims(token, settings.SECRET_KEY)
    # Checked on every use: a token remembered by _verified_claims expires like any other.
    if expires_at <= time.time():
        raise TokenDecodeError("Signature has expired")
    return claims


# A client sends the same token with every request, and verifying it again (PyJWT
# prepares the key and parses the token each time) was a tenth of a send's CPU. So the
# claims of the tokens verified lately are kept, by the exact token and key. Whether the
# user still accepts the token (token_version, is_active) is read on every request.
@functools.lru_cache(maxsize=4096)
def _verified_claims(token: str, secret_key: str) -> tuple[TokenClaims, float]:
    try:
        claims = jwt.decode(
            token,
            secret_key,
            algorithms=[JWT_ALGORITHM],
            options={"require": ["exp", "sub", "ver"]},
        )
    except jwt.InvalidTokenError as error:
        raise TokenDecodeError(str(error)) from None

    version = claims["ver"]
    # bool is an int subclass, and `true` is no token version.
    if not isinstance(version, int) or isinstance(version, bool):
        raise TokenDecodeError("claim 'ver' is not an integer")
    try:
        user_id = uuid.UUID(str(claims["sub"]))
    except ValueError:
        raise TokenDecodeError("claim 'sub' is not a UUID") from None
    return TokenClaims(user_id=user_id, token_version=version), float(claims["exp"])
