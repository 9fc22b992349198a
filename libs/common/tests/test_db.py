"""The engine: its pool replaces connections that Postgres closed while they sat idle,
and its connections name their service to Postgres."""

import asyncio

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mensajero_common.db import create_engine
from mensajero_common.settings import Settings


async def _backend(engine: AsyncEngine) -> tuple[int, asyncpg.Connection]:
    """Return the backend pid of a pooled connection, and its asyncpg connection."""
    async with engine.connect() as connection:
        pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        raw = await connection.get_raw_connection()
        return pid, raw.driver_connection


async def test_pool_replaces_terminated_connection(
    settings: Settings,
) -> None:
    engine = create_engine(settings.model_copy(update={"DATABASE_POOL_SIZE": 1}))
    admin = await asyncpg.connect(settings.DATABASE_URL.replace("+asyncpg", ""))
    try:
        first, pooled = await _backend(engine)
        closed = asyncio.Event()
        pooled.add_termination_listener(lambda _: closed.set())
        # As a Postgres restart or an administrator would: the pooled connection's
        # backend goes away while the connection is idle in the pool.
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", first) is True
        # asyncpg marks the connection closed once the server's goodbye reaches it.
        await asyncio.wait_for(closed.wait(), timeout=10)

        second, _ = await _backend(engine)

        assert second != first
    finally:
        await admin.close()
        await engine.dispose()


async def test_connections_name_their_service(settings: Settings) -> None:
    engine = create_engine(settings, application_name="mensajero-dispatcher")
    try:
        async with engine.connect() as connection:
            pid = (
                await connection.execute(text("SELECT pg_backend_pid()"))
            ).scalar_one()
            name = (
                await connection.execute(
                    text(
                        "SELECT application_name FROM pg_stat_activity WHERE pid = :pid"
                    ),
                    {"pid": pid},
                )
            ).scalar_one()
    finally:
        await engine.dispose()

    assert name == "mensajero-dispatcher"
