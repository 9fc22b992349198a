import asyncio
import os
import threading
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mensajero_common.migrate import alembic_config, create_database_if_missing, upgrade


def test_migrations_match_models(database_url: str) -> None:
    command.check(alembic_config(database_url))


async def test_migrations_seed_four_plans(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                text(
                    "SELECT code, max_sms_per_month, max_devices, price FROM userplan ORDER BY price"
                )
            )
        ).all()

    assert [
        (row.code, row.max_sms_per_month, row.max_devices, str(row.price))
        for row in rows
    ] == [
        ("free", 50, 1, "0.00"),
        ("basic", 500, 3, "9.99"),
        ("pro", 5000, 10, "29.99"),
        ("enterprise", 999999, 999, "99.99"),
    ]


async def _drop_database(server_url: str, name: str) -> None:
    connection = await asyncpg.connect(server_url.replace("+asyncpg", "") + "/postgres")
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@pytest.fixture
def scratch_database_url(database_url: str) -> Iterator[str]:
    """Create an empty database on the test server and drop it afterwards."""
    server_url = database_url.rsplit("/", 1)[0]
    name = f"mensajero_test_migrations_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    url = f"{server_url}/{name}"
    asyncio.run(create_database_if_missing(url))
    yield url
    asyncio.run(_drop_database(server_url, name))


async def _insert_messages(url: str, rows: list[tuple[str, str, str | None]]) -> None:
    """Insert one user and an outgoing message per (body, status, error)."""
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        user_id = await connection.fetchval(
            """INSERT INTO "user" (id, email, hashed_password)
            VALUES (gen_random_uuid(), 'migration@example.com', 'x') RETURNING id"""
        )
        for body, status, error in rows:
            await connection.execute(
                """INSERT INTO smsmessage (id, user_id, type, status, body, error)
                VALUES (gen_random_uuid(), $1, 'outgoing', $2, $3, $4)""",
                user_id,
                status,
                body,
                error,
            )
    finally:
        await connection.close()


async def _errors_by_body(url: str) -> dict[str, str | None]:
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        rows = await connection.fetch("SELECT body, error FROM smsmessage")
    finally:
        await connection.close()
    return {row["body"]: row["error"] for row in rows}


def test_migration_clears_errors_of_sent_messages(scratch_database_url: str) -> None:
    upgrade(scratch_database_url, "0008")
    asyncio.run(
        _insert_messages(
            scratch_database_url,
            [
                ("sent", "sent", "RESULT_ERROR_GENERIC_FAILURE"),
                ("delivered", "delivered", "RESULT_ERROR_GENERIC_FAILURE"),
                ("failed", "failed", "RESULT_ERROR_NO_SERVICE"),
                ("waiting for a retry", "pending", "RESULT_ERROR_NO_SERVICE"),
            ],
        )
    )

    upgrade(scratch_database_url, "0009")
    errors = asyncio.run(_errors_by_body(scratch_database_url))
    command.downgrade(alembic_config(scratch_database_url), "0008")

    assert errors["sent"] is None
    assert errors["delivered"] is None
    assert errors["failed"] == "RESULT_ERROR_NO_SERVICE"
    assert errors["waiting for a retry"] == "RESULT_ERROR_NO_SERVICE"


def test_migration_names_requested_device_error_by_code(
    scratch_database_url: str,
) -> None:
    upgrade(scratch_database_url, "0009")
    asyncio.run(
        _insert_messages(
            scratch_database_url,
            [
                ("named device deleted", "failed", "requested device no longer exists"),
                ("other failure", "failed", "RESULT_ERROR_NO_SERVICE"),
            ],
        )
    )

    upgrade(scratch_database_url, "0010")
    upgraded = asyncio.run(_errors_by_body(scratch_database_url))
    command.downgrade(alembic_config(scratch_database_url), "0009")
    downgraded = asyncio.run(_errors_by_body(scratch_database_url))

    assert upgraded["named device deleted"] == "requested_device_deleted"
    assert upgraded["other failure"] == "RESULT_ERROR_NO_SERVICE"
    assert downgraded["named device deleted"] == "requested device no longer exists"


async def _indexes(url: str, table: str) -> dict[str, str]:
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        rows = await connection.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1", table
        )
    finally:
        await connection.close()
    return {row["indexname"]: row["indexdef"] for row in rows}


def test_migration_indexes_devices_by_creation(scratch_database_url: str) -> None:
    upgrade(scratch_database_url, "0011")
    upgraded = asyncio.run(_indexes(scratch_database_url, "smsdevice"))
    command.downgrade(alembic_config(scratch_database_url), "0010")
    downgraded = asyncio.run(_indexes(scratch_database_url, "smsdevice"))

    assert "ix_smsdevice_user_id" not in upgraded
    assert upgraded["ix_smsdevice_user_id_created_at_id"].endswith(
        "(user_id, created_at, id)"
    )
    assert "ix_smsdevice_user_id_created_at_id" not in downgraded
    assert downgraded["ix_smsdevice_user_id"].endswith("(user_id)")


def test_migration_indexes_waiting_messages(scratch_database_url: str) -> None:
    upgrade(scratch_database_url, "0012")
    upgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))
    command.downgrade(alembic_config(scratch_database_url), "0011")
    downgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))

    waiting = upgraded["ix_smsmessage_user_id_created_at_id_waiting"]
    assert "(user_id, created_at, id)" in waiting
    assert "'pending'" in waiting
    assert "'assigned'" in waiting
    assert "ix_smsmessage_user_id_created_at_id_waiting" not in downgraded
    assert "ix_smsmessage_user_id_created_at_id" in downgraded


def test_migration_indexes_pending_messages(scratch_database_url: str) -> None:
    upgrade(scratch_database_url, "0013")
    upgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))
    command.downgrade(alembic_config(scratch_database_url), "0012")
    downgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))

    pending = upgraded["ix_smsmessage_created_at_id_pending"]
    retry = upgraded["ix_smsmessage_created_at_id_retry"]
    assert "(created_at, id)" in pending
    assert "'pending'" in pending
    assert "next_attempt_at IS NOT NULL" in retry
    assert "ix_smsmessage_created_at_id_pending" not in downgraded
    assert "ix_smsmessage_created_at_id_retry" not in downgraded


def test_migration_keeps_sweep_index_off_in_flight_counts(
    scratch_database_url: str,
) -> None:
    upgrade(scratch_database_url, "0014")
    upgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))
    command.downgrade(alembic_config(scratch_database_url), "0013")
    downgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))

    assert (
        "(type)::text || ''::text) = 'outgoing'"
        in upgraded["ix_smsmessage_updated_at_open"]
    )
    assert "'outgoing'" not in downgraded["ix_smsmessage_updated_at_open"]
    assert "ix_smsmessage_updated_at_open_new" not in upgraded
    assert "ix_smsmessage_updated_at_open_new" not in downgraded


def test_migration_writes_fewer_message_index_entries(
    scratch_database_url: str,
) -> None:
    upgrade(scratch_database_url, "0015")
    upgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))
    command.downgrade(alembic_config(scratch_database_url), "0014")
    downgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))

    assert "ix_smsmessage_user_id" not in upgraded
    assert "ix_smsmessage_user_id_created_at_id" in upgraded
    assert upgraded["ix_smsmessage_bulk_id"].endswith("WHERE (bulk_id IS NOT NULL)")
    assert downgraded["ix_smsmessage_user_id"].endswith("(user_id)")
    assert downgraded["ix_smsmessage_bulk_id"].endswith("(bulk_id)")
    assert "ix_smsmessage_bulk_id_new" not in upgraded
    assert "ix_smsmessage_bulk_id_new" not in downgraded


async def _insert_users(url: str, emails: list[str]) -> None:
    """Insert one user per email, each created a second after the one before."""
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        for offset_s, email in enumerate(emails):
            await connection.execute(
                """INSERT INTO "user" (id, email, hashed_password, created_at)
                VALUES (gen_random_uuid(), $1, 'x',
                        now() + make_interval(secs => $2))""",
                email,
                offset_s,
            )
    finally:
        await connection.close()


async def _emails(url: str) -> list[str]:
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        rows = await connection.fetch('SELECT email FROM "user" ORDER BY created_at')
    finally:
        await connection.close()
    return [row["email"] for row in rows]


def test_migration_indexes_listing_filters(scratch_database_url: str) -> None:
    upgrade(scratch_database_url, "0017")
    upgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))
    command.downgrade(alembic_config(scratch_database_url), "0016")
    downgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))

    assert (
        "(user_id, status, created_at, id) WHERE"
        in (upgraded["ix_smsmessage_user_id_status_created_at_id_failed"])
    )
    assert upgraded["ix_smsmessage_user_id_to_number_created_at_id"].endswith(
        "(user_id, to_number, created_at, id)"
    )
    assert upgraded["ix_smsmessage_user_id_from_number_created_at_id"].endswith(
        "(user_id, from_number, created_at, id) WHERE (from_number IS NOT NULL)"
    )
    assert upgraded["ix_smsmessage_user_id_created_at_id_incoming"].endswith(
        "(user_id, created_at, id) WHERE ((type)::text = 'incoming'::text)"
    )
    for old in ("ix_smsmessage_status", "ix_smsmessage_to_number"):
        assert old not in upgraded
        assert old in downgraded
    assert downgraded["ix_smsmessage_from_number"].endswith("(from_number)")
    assert "ix_smsmessage_user_id_status_created_at_id_failed" not in downgraded
    assert "ix_smsmessage_user_id_created_at_id_incoming" not in downgraded


def test_migration_indexes_messages_by_device(scratch_database_url: str) -> None:
    upgrade(scratch_database_url, "0018")
    upgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))
    command.downgrade(alembic_config(scratch_database_url), "0017")
    downgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))

    assert "ix_smsmessage_device_id" not in upgraded
    assert upgraded["ix_smsmessage_device_id_created_at_id"].endswith(
        "(device_id, created_at, id)"
    )
    assert "ix_smsmessage_device_id_created_at_id" not in downgraded
    assert downgraded["ix_smsmessage_device_id"].endswith("(device_id)")


def _hold_snapshot(url: str, seconds: float, taken: threading.Event) -> None:
    """Keep a repeatable read transaction, and so its snapshot, open for `seconds`."""

    async def hold() -> None:
        connection = await asyncpg.connect(url.replace("+asyncpg", ""))
        transaction = connection.transaction(isolation="repeatable_read")
        await transaction.start()
        await connection.fetchval("SELECT count(*) FROM smsmessage")
        taken.set()
        await asyncio.sleep(seconds)
        await transaction.rollback()
        await connection.close()

    asyncio.run(hold())


def test_migration_waits_for_long_transaction(scratch_database_url: str) -> None:
    # A transaction older than the index builds, as a pg_dump holds, for longer than
    # the migrations' lock timeout of 5 s.
    upgrade(scratch_database_url, "0016")
    snapshot_taken = threading.Event()
    holder = threading.Thread(
        target=_hold_snapshot, args=(scratch_database_url, 7, snapshot_taken)
    )
    holder.start()
    try:
        assert snapshot_taken.wait(timeout=30)
        upgrade(scratch_database_url, "0017")
    finally:
        holder.join()
    upgraded = asyncio.run(_indexes(scratch_database_url, "smsmessage"))

    assert "ix_smsmessage_user_id_created_at_id_incoming" in upgraded


def test_migration_normalizes_emails_to_nfkc(scratch_database_url: str) -> None:
    upgrade(scratch_database_url, "0015")
    asyncio.run(
        _insert_users(
            scratch_database_url,
            [
                "ﬁnn@example.com",
                "k955537@example.com",
                "ｋ955537@example.com",
                "ｂob@example.com",
                "ⓑob@example.com",
                "ａ﹫b@example.com",
                "a\u2025b@example.com",
                "\u2024ab@example.com",
                "josé@example.com",
            ],
        )
    )

    upgrade(scratch_database_url, "0016")
    upgraded = asyncio.run(_emails(scratch_database_url))
    command.downgrade(alembic_config(scratch_database_url), "0015")

    assert upgraded == [
        "finn@example.com",
        "k955537@example.com",
        # Its NFKC form is the older account's address.
        "ｋ955537@example.com",
        "bob@example.com",
        # Its NFKC form went to the older "ｂob" a moment before.
        "ⓑob@example.com",
        # Its NFKC form "a@b@example.com" is no address.
        "ａ﹫b@example.com",
        # Their NFKC forms "a..b@" and ".ab@" are rejected at sign-up.
        "a\u2025b@example.com",
        "\u2024ab@example.com",
        "josé@example.com",
    ]
