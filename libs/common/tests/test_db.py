"""The engine's pool replaces connections that Postgres closed while they sat idle."""

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mensajero_common.db import create_engine
from mensajero_common.settings import Settings


async def _backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text("SELECT pg_backend_pid()"))).scalar())


async def test_a_terminated_idle_connection_is_replaced_at_checkout(
    settings: Settings,
) -> None:
    engine = create_engine(settings.model_copy(update={"DATABASE_POOL_SIZE": 1}))
    admin = await asyncpg.connect(settings.DATABASE_URL.replace("+asyncpg", ""))
    try:
        first = await _backend_pid(engine)
        # As a Postgres restart or an administrator would: the pooled connection's
        # backend goes away while the connection is idle in the pool.
        terminated = await admin.fetchval("SELECT pg_terminate_backend($1)", first)
        assert terminated is True
        for _ in range(50):
            if not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", first
            ):
                break

        second = await _backend_pid(engine)

        assert second != first
    finally:
        await admin.close()
        await engine.dispose()
