"""Connections and helpers that the API opens at start and shares between requests."""

from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from mensajero_api.auth.security import PasswordHasher
from mensajero_common.keys import RedisKeys
from mensajero_common.settings import Settings


@dataclass(frozen=True)
class Resources:
    settings: Settings
    engine: AsyncEngine
    session_factory: async_sessionmaker[AsyncSession]
    redis: Redis
    keys: RedisKeys
    passwords: PasswordHasher
