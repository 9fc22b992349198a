"""The dispatcher's reads of waiting messages read about what they need, whatever the
backlog or the history: a page of a pending sweep about a page of messages, and the
check for waiting messages none of the delivered ones.

Each test inserts its rows in a transaction that is rolled back, analyzes them there,
and runs the statement under EXPLAIN ANALYZE, as it is or as a prepared statement on its
generic plan. Before the indexes of pending messages on (created_at, id), each page read
and sorted every pending message.
"""

import json
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy.dialects import postgresql

from mensajero_common.testing import generic_plan, rows_read
from mensajero_dispatcher.attempts import repository as attempts_repository
from mensajero_dispatcher.devices import repository as device_repository
from mensajero_dispatcher.messages import repository
from mensajero_dispatcher.messages.repository import AnySelect
from mensajero_dispatcher.recovery import repository as recovery_repository

BACKLOG = 3000
PAGE = 100
# Backlog messages are older than anything other tests leave, so a page that walks the
# index in order finds them first.
BACKLOG_START = datetime(2001, 1, 1, tzinfo=UTC)


async def _insert_user(
    connection: asyncpg.Connection, online: bool, device_id: uuid.UUID | None = None
) -> uuid.UUID:
    """Insert a user with one device, online or not, and return the user's id."""
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
        device_id or uuid.uuid4(),
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
    messages = []
    for index in range(BACKLOG):
        user_id = online if index % 2 == 0 else offline
        created_at = BACKLOG_START + timedelta(seconds=index)
        messages.append((user_id, "pending", created_at, None, 0))
    if retries:
        due = datetime.now(UTC) - timedelta(minutes=1)
        for index in range(PAGE):
            created_at = BACKLOG_START + timedelta(seconds=BACKLOG + index)
            messages.append((online, "pending", created_at, due, 1))
    await _insert_messages(connection, messages)


async def _insert_messages(
    connection: asyncpg.Connection,
    messages: list[tuple[uuid.UUID, str, datetime, datetime | None, int]],
    *,
    analyze: bool = True,
) -> None:
    """Insert outgoing messages, each given as (user_id, status, created_at,
    next_attempt_at, attempts), then analyze the table if `analyze` is true."""
    await connection.copy_records_to_table(
        "smsmessage",
        records=[
            (
                uuid.uuid4(),
                user_id,
                "outgoing",
                status,
                "+34600000000",
                "hola",
                created_at,
                created_at,
                next_attempt_at,
                attempts,
            )
            for user_id, status, created_at, next_attempt_at, attempts in messages
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
    if analyze:
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
    return rows_read(json.loads(plan)[0]["Plan"], "smsmessage")


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
    async def insert_backlog(connection: asyncpg.Connection) -> None:
        await _insert_backlog(connection, retries=True)

    assignable = await generic_plan(
        pg_connection,
        repository.assignable_pending_statement(0, None, PAGE),
        insert_backlog,
    )
    retries = await generic_plan(
        pg_connection, repository.due_retries_statement(None, PAGE), insert_backlog
    )

    assert "ix_smsmessage_created_at_id_pending" in json.dumps(assignable)
    assert "ix_smsmessage_created_at_id_retry" in json.dumps(retries)


async def test_waiting_check_skips_delivered_history(pg_connection) -> None:
    device_id = uuid.uuid4()
    waiting_in_table = []

    async def insert_history(connection: asyncpg.Connection) -> None:
        user_id = await _insert_user(connection, online=True, device_id=device_id)
        delivered = [
            (user_id, "delivered", BACKLOG_START + timedelta(seconds=index), None, 1)
            for index in range(BACKLOG)
        ]
        waiting = (user_id, "pending", datetime.now(UTC), None, 0)
        await _insert_messages(connection, [*delivered, waiting])
        waiting_in_table.append(
            await connection.fetchval(
                "SELECT count(*) FROM smsmessage"
                " WHERE status IN ('pending', 'assigned')"
            )
        )

    plan = await generic_plan(
        pg_connection,
        device_repository.waiting_messages_statement([device_id]),
        insert_history,
    )

    # Waiting messages (other tests running meanwhile may have some), not the user's
    # history of delivered ones.
    assert rows_read(plan, "smsmessage") <= waiting_in_table[0] + 10


async def test_stale_sweep_generic_plan_reads_one_page(pg_connection) -> None:
    async def insert_backlog(connection: asyncpg.Connection) -> None:
        await _insert_backlog(connection, retries=False)

    plan = await generic_plan(
        pg_connection,
        recovery_repository.stale_messages_statement(60, None, PAGE),
        insert_backlog,
    )

    assert "ix_smsmessage_updated_at_open" in json.dumps(plan)
    assert rows_read(plan, "smsmessage") <= 2 * PAGE


async def _insert_user_with_history(
    connection: asyncpg.Connection, device_id: uuid.UUID
) -> uuid.UUID:
    """Insert a user with one online device and BACKLOG delivered messages, analyze the
    table, and return the user's id."""
    user_id = await _insert_user(connection, online=True, device_id=device_id)
    history = [
        (user_id, "delivered", BACKLOG_START + timedelta(seconds=index), None, 1)
        for index in range(BACKLOG)
    ]
    await _insert_messages(connection, history)
    return user_id


def _pending_backlog(
    user_id: uuid.UUID,
) -> list[tuple[uuid.UUID, str, datetime, datetime | None, int]]:
    return [
        (user_id, "pending", BACKLOG_START + timedelta(seconds=index), None, 0)
        for index in range(BACKLOG)
    ]


async def test_in_flight_count_skips_pending_backlog(pg_connection) -> None:
    # The statistics are taken before anything is in flight or pending, as when a bulk
    # send lands on a table last analyzed while it held only delivered messages. The
    # count then read every pending message through the recovery sweep's index.
    connection = pg_connection
    device_id = uuid.uuid4()
    transaction = connection.transaction()
    await transaction.start()
    try:
        user_id = await _insert_user_with_history(connection, device_id)
        await connection.execute(
            "INSERT INTO smsmessage (id, user_id, type, status, to_number, body,"
            " device_id) SELECT gen_random_uuid(), $1, 'outgoing', 'assigned',"
            " '+34600000000', 'hola', $2 FROM generate_series(1, 5)",
            user_id,
            device_id,
        )
        await _insert_messages(connection, _pending_backlog(user_id), analyze=False)
        in_flight_in_table = await connection.fetchval(
            "SELECT count(*) FROM smsmessage WHERE status IN ('assigned', 'sending')"
        )
        plan = await connection.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + repository._LEAST_LOADED_DEVICES,
            [user_id],
            [None],
        )
    finally:
        await transaction.rollback()

    # In-flight messages (other tests running meanwhile may have some), not the backlog.
    read = rows_read(json.loads(plan)[0]["Plan"], "smsmessage")
    assert read <= in_flight_in_table + 10


async def test_waiting_check_skips_other_users_backlog(pg_connection) -> None:
    # Statistics from before the backlog, as in the test above. The check then read every
    # open message through the recovery sweep's index, looking for one of this user.
    connection = pg_connection
    device_id = uuid.uuid4()
    transaction = connection.transaction()
    await transaction.start()
    try:
        await _insert_user_with_history(connection, device_id)
        other_user_id = await _insert_user(connection, online=False)
        await _insert_messages(
            connection, _pending_backlog(other_user_id), analyze=False
        )
        sql = str(
            device_repository.waiting_messages_statement([device_id]).compile(
                dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
            )
        )
        plan = await connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
    finally:
        await transaction.rollback()

    assert rows_read(json.loads(plan)[0]["Plan"], "smsmessage") <= 10


async def _insert_device_history(
    connection: asyncpg.Connection, device_id: uuid.UUID
) -> int:
    """Insert a device with BACKLOG delivered messages and a few open ones (in flight,
    some on a deleted device, some expired), analyze the table, and return how many
    messages in the table are open."""
    user_id = await _insert_user(connection, online=True, device_id=device_id)
    # A second online device, so that unacknowledged tasks have somewhere to move.
    await connection.execute(
        "INSERT INTO smsdevice (id, user_id, name, api_key_hash, api_key_prefix,"
        " status, last_heartbeat) VALUES ($1, $2, 'phone', $3, 'msj_', 'online', now())",
        uuid.uuid4(),
        user_id,
        uuid.uuid4().hex,
    )
    await connection.execute(
        "INSERT INTO smsmessage (id, user_id, device_id, type, status, to_number, body,"
        " created_at, updated_at, assigned_at, sending_at, expires_at)"
        " SELECT gen_random_uuid(), $1,"
        "  CASE WHEN n > $3 AND n % 7 = 3 THEN NULL ELSE $2::uuid END, 'outgoing',"
        "  CASE WHEN n <= $3 THEN 'delivered'"
        "   WHEN n % 2 = 0 THEN 'assigned' ELSE 'sending' END,"
        "  '+34600000000', 'hola', moment, moment, moment, moment,"
        "  CASE WHEN n > $3 AND n % 5 = 0 THEN now() - interval '1 minute' END"
        " FROM generate_series(1, $3::integer + 20) AS n,"
        "  LATERAL (SELECT $4::timestamptz + n * interval '1 second' AS moment) AS times",
        user_id,
        device_id,
        BACKLOG,
        BACKLOG_START,
    )
    await connection.execute("ANALYZE smsmessage")
    open_messages: int = await connection.fetchval(
        "SELECT count(*) FROM smsmessage"
        " WHERE status IN ('pending', 'assigned', 'sending')"
    )
    return open_messages


def _rows_estimated(node: Mapping[str, Any], table: str) -> float:
    """Return the rows that the plan estimates its scans of `table` to return."""
    estimated = float(node["Plan Rows"]) if node.get("Relation Name") == table else 0.0
    for child in node.get("Plans", []):
        estimated += _rows_estimated(child, table)
    return estimated


# Builders of the statements that look for open messages by status, each given the
# device that _insert_device_history inserts, with the partial index whose predicate
# the statement matches, if it matches one.
_OPEN_MESSAGE_CHECKS: dict[str, tuple[Callable[[uuid.UUID], AnySelect], str | None]] = {
    "devices_with_tasks": (
        lambda _: repository.devices_with_tasks_statement(0, None, PAGE),
        "ix_smsmessage_device_id_in_flight",
    ),
    "in_flight_ids": (
        lambda device_id: repository.in_flight_ids_statement([device_id], 0),
        "ix_smsmessage_device_id_in_flight",
    ),
    "unacknowledged": (
        lambda _: attempts_repository.unacknowledged_statement(
            ack_timeout_s=0, silent_after_s=0, stuck_after_s=0, user_id=None, limit=PAGE
        ),
        None,
    ),
    "deleted_device_tasks": (
        lambda _: attempts_repository.deleted_device_tasks_statement(PAGE),
        "ix_smsmessage_device_id_in_flight",
    ),
    "expired": (
        lambda _: attempts_repository.expired_statement(PAGE),
        "ix_smsmessage_expires_at_open",
    ),
}


@pytest.mark.parametrize("check", sorted(_OPEN_MESSAGE_CHECKS))
async def test_open_message_check_generic_plan_skips_history(
    pg_connection, check: str
) -> None:
    # With their statuses bound, the generic plans of these statements could use no
    # partial index. They read every message of a device or the whole status index,
    # and their cost grew with the history until Postgres compiled them with JIT on
    # every run.
    build_statement, partial_index = _OPEN_MESSAGE_CHECKS[check]
    device_id = uuid.uuid4()
    open_in_table = []

    async def insert_history(connection: asyncpg.Connection) -> None:
        open_in_table.append(await _insert_device_history(connection, device_id))

    plan = await generic_plan(pg_connection, build_statement(device_id), insert_history)

    # Open messages (other tests running meanwhile may have some), not the delivered
    # history, both read and in the estimate that the plan's cost comes from.
    assert rows_read(plan, "smsmessage") <= open_in_table[0] + 10
    assert _rows_estimated(plan, "smsmessage") <= open_in_table[0] + 10
    if partial_index is not None:
        assert partial_index in json.dumps(plan)
