"""The benchmark's own Postgres connections, which wait for a free connection slot.

The server's max_connections is shared with every other client, and the stack alone may
hold 90 of the default 100. A connection the benchmark opens for itself waits for a slot
instead of failing the step it belongs to.
"""

import asyncio
import time
from typing import Any

import asyncpg

# How long a connection waits for a slot before the step fails.
CONNECT_PATIENCE_S = 30.0
RETRY_INTERVAL_S = 0.5


async def connect(dsn: str, **options: Any) -> asyncpg.Connection:
    """asyncpg.connect, retried while the server has no connection slot free."""
    give_up_at = time.monotonic() + CONNECT_PATIENCE_S
    while True:
        try:
            return await asyncpg.connect(dsn, **options)
        except asyncpg.TooManyConnectionsError:
            if time.monotonic() >= give_up_at:
                raise
            await asyncio.sleep(RETRY_INTERVAL_S)


async def free_connection_slots(dsn: str) -> tuple[int, int]:
    """Return the server's max_connections and how many of them are free now.

    Slots reserved for superusers (superuser_reserved_connections) are not counted as
    free, since the services connect as ordinary users on most installations.
    """
    connection = await connect(dsn)
    try:
        row = await connection.fetchrow(
            """
            SELECT current_setting('max_connections')::int AS max,
                   current_setting('superuser_reserved_connections')::int AS reserved,
                   (SELECT count(*) FROM pg_stat_activity
                     WHERE backend_type = 'client backend')::int AS used
            """
        )
    finally:
        await connection.close()
    return row["max"], row["max"] - row["reserved"] - row["used"]
