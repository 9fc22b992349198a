"""Resources shared by the stream consumer and the periodic jobs of one process."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.db import create_engine, create_session_factory
from mensajero_common.keys import RedisKeys
from mensajero_common.redis import create_redis
from mensajero_common.settings import Settings


@dataclass(frozen=True)
class DispatcherContext:
    settings: Settings
    keys: RedisKeys
    session_factory: async_sessionmaker[AsyncSession]
    redis: ArqRedis


@asynccontextmanager
async def open_context(settings: Settings) -> AsyncIterator[DispatcherContext]:
    """Open the engine and the Redis client, and close both on exit."""
    engine = create_engine(settings, application_name="mensajero-dispatcher")
    redis = create_redis(settings)
    try:
        yield DispatcherContext(
            settings=settings,
            keys=RedisKeys(settings.REDIS_KEY_PREFIX),
            session_factory=create_session_factory(engine),
            redis=redis,
        )
    finally:
        await redis.aclose()
        await engine.dispose()
