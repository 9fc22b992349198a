"""Fixtures shared by every test suite: a migrated test database and an isolated Redis.

Each pytest run creates its own database (`mensajero_test_<pid>`), migrates it once and
drops it at the end; each test truncates the tables it may touch. Redis keys of a test
start with a prefix of their own on DB index MENSAJERO_TEST_REDIS_DB (default 13), and are
deleted when the test ends.
"""

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from mensajero_common.keys import RedisKeys
from mensajero_common.migrate import create_database_if_missing, upgrade
from mensajero_common.settings import Settings

POSTGRES_SERVER = os.environ.get(
    "MENSAJERO_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432"
)
REDIS_SERVER = os.environ.get("MENSAJERO_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("MENSAJERO_TEST_REDIS_DB", "13"))
TEST_DATABASE = f"mensajero_test_{os.getpid()}"
TABLES = (
    "webhookattempt",
    "webhookdelivery",
    "webhookevent",
    "smsmessage",
    "smsdevice",
    "webhookconfig",
    "userquota",
    '"user"',
)


async def _drop_database(name: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(
        POSTGRES_SERVER.replace("+asyncpg", "") + "/postgres"
    )
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def database_url() -> AsyncIterator[str]:
    url = f"{POSTGRES_SERVER}/{TEST_DATABASE}"
    asyncio.run(_drop_database(TEST_DATABASE))
    asyncio.run(create_database_if_missing(url))
    upgrade(url)
    yield url
    asyncio.run(_drop_database(TEST_DATABASE))


@pytest.fixture
def settings(database_url: str) -> Iterator[Settings]:
    test_settings = Settings(
        _env_file=None,
        ENVIRONMENT="test",
        DATABASE_URL=database_url,
        REDIS_URL=f"{REDIS_SERVER}/{REDIS_DB}",
        REDIS_KEY_PREFIX=f"mtest:{uuid.uuid4().hex[:12]}",
        SECRET_KEY="test-secret-key-that-is-long-enough-for-hs256",
        FIRST_SUPERUSER="admin@example.com",
        FIRST_SUPERUSER_PASSWORD="admin-password-for-tests",
        LOG_JSON=False,
        # Small pools, so that the services of parallel tests stay within Postgres's
        # default 100 connections.
        DATABASE_POOL_SIZE=2,
        DATABASE_MAX_OVERFLOW=4,
        # Workers started by a test serve no ops endpoints unless the test asks for them,
        # so parallel runs never compete for a fixed port.
        DISPATCHER_OPS_PORT=0,
        WEBHOOKS_OPS_PORT=0,
        # Many tests hand one phone a burst of tasks; the tests of the pace set their own.
        DEVICE_SMS_PER_MINUTE=100_000,
    )
    yield test_settings
    # Here rather than in the `redis` fixture, because many tests never request it. A
    # hub or a report writer that such a test starts still writes under the prefix.
    _delete_keys(test_settings)


def _delete_keys(settings: Settings) -> None:
    """Delete the Redis keys under the test's prefix.

    arq keeps jobs under its own "arq:job:", "arq:in-progress:" and "arq:retry:"
    prefixes, followed by a job id that starts with the test's prefix.
    """
    client = SyncRedis.from_url(settings.REDIS_URL)
    try:
        keys = list(
            client.scan_iter(match=f"*{settings.REDIS_KEY_PREFIX}:*", count=1000)
        )
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database_url, pool_size=5, max_overflow=10)
    yield engine
    await engine.dispose()


@pytest.fixture
async def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    async with engine.begin() as connection:
        await connection.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    return async_sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
async def pg_connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the test database, without the engine's codecs."""
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    yield connection
    await connection.close()


@pytest.fixture
def redis_keys(settings: Settings) -> RedisKeys:
    return RedisKeys(settings.REDIS_KEY_PREFIX)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client: Redis[bytes] = Redis.from_url(settings.REDIS_URL)
    yield client
    await client.aclose()
