"""A page of a pending sweep reads about a page of messages, whatever the backlog.

Each test inserts a backlog in a transaction that is rolled back, analyzes it there, and
runs the page's statement under EXPLAIN ANALYZE or plans it as a prepared statement.
Before the indexes of pending messages on (created_at, id), each page read and sorted
every pending message.
"""

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect

from mensajero_dispatcher.messages import repository
from mensajero_dispatcher.messages.repository import AnySelect

BACKLOG = 3000
PAGE = 100
# Backlog messages are older than anything other tests leave, so a page that walks the
# index in order finds them first.
BACKLOG_START = datetime(2001, 1, 1, tzinfo=UTC)


async def _insert_user(connection: asyncpg.Connection, online: bool) -> uuid.UUID:
    user_id = uuid.uuid4()
    await connection.execute(
        'INSERT INTO "user" (id, email, hashed_password) VALUES ($1, $2, $3)',
        user_id,
        f"{user_id}@example.com",
        "unused",
    )
    await connection.execute(
        "INSERT INTO smsdevice (id, user_id, name, api_key_hash, api_key_prefix,"
        " status, last_heartbeat) VALUES ($1, $2, 'phone', $3, 'msj_', $4, now())",
        uuid.uuid4(),
        user_id,
        uuid.uuid4().hex,
        "online" if online else "offline",
    )
    return user_id


async def _insert_backlog(connection: asyncpg.Connection, *, retries: bool) -> None:
    """Insert BACKLOG pending messages, half of them for a user with no device online,
    and, with `retries`, a page of due retries after them."""
    online = await _insert_user(connection, online=True)
    offline = await _insert_user(connection, online=False)
    records = []
    for index in range(BACKLOG):
        created_at = BACKLOG_START + timedelta(seconds=index)
        user_id = online if index % 2 == 0 else offline
        records.append((uuid.uuid4(), user_id, created_at, created_at, None, 0))
    if retries:
        due = datetime.now(UTC) - timedelta(minutes=1)
        for index in range(PAGE):
            created_at = BACKLOG_START + timedelta(seconds=BACKLOG + index)
            records.append((uuid.uuid4(), online, created_at, created_at, due, 1))
    await connection.copy_records_to_table(
        "smsmessage",
        records=[
            (*record[:2], "outgoing", "pending", "+34600000000", "hola", *record[2:])
            for record in records
        ],
        columns=(
            "id",
            "user_id",
            "type",
            "status",
            "to_number",
            "body",
            "created_at",
            "updated_at",
            "next_attempt_at",
            "attempts",
        ),
    )
    await connection.execute("ANALYZE smsmessage")


async def _messages_read(
    connection: asyncpg.Connection, statement: AnySelect, *, retries: bool
) -> int:
    """Insert a backlog, run `statement` on it under EXPLAIN ANALYZE and return the
    messages it read, then roll everything back."""
    sql = str(
        statement.compile(
            dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
        )
    )
    transaction = connection.transaction()
    await transaction.start()
    try:
        await _insert_backlog(connection, retries=retries)
        plan = await connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
    finally:
        await transaction.rollback()
    return _rows_read(json.loads(plan)[0]["Plan"], "smsmessage")


async def _generic_plan(connection: asyncpg.Connection, statement: AnySelect) -> str:
    """Return the generic plan of `statement` on a backlog: the plan that Postgres may
    cache for a prepared statement after five runs, made without its parameters."""
    compiled = statement.compile(dialect=asyncpg_dialect.dialect())
    arguments = ", ".join(
        _sql_literal(compiled.params[name]) for name in compiled.positiontup or ()
    )
    transaction = connection.transaction()
    await transaction.start()
    try:
        await _insert_backlog(connection, retries=True)
        await connection.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await connection.execute(f"PREPARE sweep_page AS {compiled}")
        try:
            plan = await connection.fetchval(
                f"EXPLAIN (FORMAT JSON) EXECUTE sweep_page({arguments})"
            )
        finally:
            await connection.execute("DEALLOCATE sweep_page")
    finally:
        await transaction.rollback()
    return str(plan)


def _sql_literal(value: object) -> str:
    if isinstance(value, timedelta):
        return f"interval '{value.total_seconds()} seconds'"
    if isinstance(value, int):
        return str(value)
    return "'" + str(getattr(value, "value", value)) + "'"


def _rows_read(node: Mapping[str, Any], table: str) -> int:
    """Return the rows that the plan's scans of `table` read, filtered ones included."""
    read = 0
    if node.get("Relation Name") == table:
        read += node["Actual Rows"] * node["Actual Loops"]
        read += node.get("Rows Removed by Filter", 0)
        read += node.get("Rows Removed by Index Recheck", 0)
    for child in node.get("Plans", []):
        read += _rows_read(child, table)
    return read


async def test_assignable_page_reads_one_page(pg_connection) -> None:
    statement = repository.assignable_pending_statement(0, None, PAGE)

    read = await _messages_read(pg_connection, statement, retries=False)

    # Half of the backlog waits for a device, so a page skips about as many as it takes.
    assert read <= 3 * PAGE


async def test_due_retries_page_skips_untried_messages(pg_connection) -> None:
    statement = repository.due_retries_statement(None, PAGE)

    read = await _messages_read(pg_connection, statement, retries=True)

    assert read <= 2 * PAGE


async def test_generic_plans_use_pending_indexes(pg_connection) -> None:
    assignable = await _generic_plan(
        pg_connection, repository.assignable_pending_statement(0, None, PAGE)
    )
    retries = await _generic_plan(
        pg_connection, repository.due_retries_statement(None, PAGE)
    )

    assert "ix_smsmessage_created_at_id_pending" in assignable
    assert "ix_smsmessage_created_at_id_retry" in retries
