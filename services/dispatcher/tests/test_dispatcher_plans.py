"""Statements that take messages by id probe the primary key, whatever the statistics.

On statistics taken while no message was pending, Postgres chose an index of open
messages for these statements and read every pending message on each call. Each test
checks that no index on the status can serve the statement.
"""

import uuid

import asyncpg
from sqlalchemy.dialects import postgresql

from mensajero_common.testing import status_indexes_usable
from mensajero_dispatcher.messages import repository


async def _status_indexes(
    connection: asyncpg.Connection, statement: str, *args: object
) -> set[str]:
    return await status_indexes_usable(
        connection, "smsmessage", "pk_smsmessage", statement, *args
    )


async def test_mark_assigned_uses_no_status_index(pg_connection) -> None:
    used = await _status_indexes(
        pg_connection, repository._MARK_ASSIGNED, [uuid.uuid4()], [uuid.uuid4()], [0]
    )

    assert used == set()


async def test_find_pending_uses_no_status_index(pg_connection) -> None:
    used = await _status_indexes(
        pg_connection, repository._FIND_PENDING_BY_IDS, [uuid.uuid4()]
    )

    assert used == set()


async def test_lock_pending_uses_no_status_index(pg_connection) -> None:
    statement = repository._LOCK_PENDING_BY_IDS.params(message_ids=[uuid.uuid4()])
    sql = str(
        statement.compile(
            dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
        )
    )

    used = await _status_indexes(pg_connection, sql)

    assert used == set()
