"""The message listing reads about one page, whatever a user's history holds, and its
branches (one per status and number column) page in order.

Each plan test inserts a history in a transaction that is rolled back, analyzes it
there, and runs the listing's statement under EXPLAIN ANALYZE. Before the listing's indexes by user,
a filter that matched none of the history (`status=failed`, `/incoming`) read all of it,
and a phone filter read every user's messages to or from that number.
"""

import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from api_test_helpers import ApiUser
from httpx import AsyncClient
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.messages.repository import MessageFilters, listing_statement
from mensajero_common.models import MessageStatus, MessageType, SMSMessage
from mensajero_common.testing import generic_plan, rows_read

MESSAGES_URL = "/api/v1/sms/messages"

HISTORY = 3000
PAGE = 50
NUMBER = "+34600000001"


async def _insert_user(
    connection: asyncpg.Connection, user_id: uuid.UUID | None = None
) -> uuid.UUID:
    user_id = user_id or uuid.uuid4()
    await connection.execute(
        'INSERT INTO "user" (id, email, hashed_password) VALUES ($1, $2, $3)',
        user_id,
        f"{user_id}@example.com",
        "unused",
    )
    return user_id


async def _insert_history(
    connection: asyncpg.Connection,
) -> tuple[uuid.UUID, uuid.UUID]:
    """Insert HISTORY delivered messages to NUMBER for one user, and one such message
    for a second user; return both users' ids."""
    busy, quiet = await _insert_user(connection), await _insert_user(connection)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    rows = [(busy, start + timedelta(seconds=index)) for index in range(HISTORY)] + [
        (quiet, start)
    ]
    await connection.copy_records_to_table(
        "smsmessage",
        records=[
            (uuid.uuid4(), user_id, "outgoing", "delivered", NUMBER, "hola", at, at)
            for user_id, at in rows
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
        ),
    )
    await connection.execute("ANALYZE smsmessage")
    return busy, quiet


async def _listing_reads(
    connection: asyncpg.Connection, filters: MessageFilters, *, busy_user: bool
) -> int:
    """Insert the history, run the listing's first page under EXPLAIN ANALYZE, and
    return the messages it read, then roll everything back."""
    transaction = connection.transaction()
    await transaction.start()
    try:
        busy, quiet = await _insert_history(connection)
        # On a few thousand rows, a sequential scan is the cheapest way to fetch even
        # one page by id. On a real history Postgres reads the page by its ids.
        await connection.execute("SET LOCAL enable_seqscan = off")
        statement = listing_statement(
            busy if busy_user else quiet,
            filters,
            after=None,
            descending=True,
            limit=PAGE + 1,
        )
        sql = statement.compile(
            dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
        )
        plan = await connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
    finally:
        await transaction.rollback()
    return rows_read(json.loads(plan)[0]["Plan"], "smsmessage")


@pytest.mark.parametrize(
    "filters",
    [
        MessageFilters(statuses=(MessageStatus.FAILED,)),
        MessageFilters(statuses=(MessageStatus.FAILED, MessageStatus.EXPIRED)),
        MessageFilters(type=MessageType.INCOMING),
        MessageFilters(phone="+34699999999"),
    ],
    ids=["one_status", "two_statuses", "incoming", "other_number"],
)
async def test_rare_filter_skips_history(
    pg_connection: asyncpg.Connection, filters: MessageFilters
) -> None:
    read = await _listing_reads(pg_connection, filters, busy_user=True)

    assert read <= PAGE


async def test_common_filter_reads_one_page(pg_connection: asyncpg.Connection) -> None:
    filters = MessageFilters(statuses=(MessageStatus.DELIVERED,), phone=NUMBER)

    read = await _listing_reads(pg_connection, filters, busy_user=True)

    # The number's two branches, each stopped at the page's limit.
    assert read <= 2 * (PAGE + 1)


async def test_phone_filter_skips_other_users(
    pg_connection: asyncpg.Connection,
) -> None:
    read = await _listing_reads(
        pg_connection, MessageFilters(phone=NUMBER), busy_user=False
    )

    assert read <= 2


# Devices of the device filter's test besides the two it reads, with a few messages each.
# With only two devices in the table, the generic plan estimates that half of a user's
# messages match any device, so walking the user's history looks as cheap as reading the
# device's index, and which one Postgres picks varies.
OTHER_DEVICES = 200
OTHER_DEVICE_MESSAGES = 5


async def _insert_devices(
    connection: asyncpg.Connection, user_id: uuid.UUID, devices: list[uuid.UUID]
) -> None:
    """Insert the user with its devices: HISTORY older messages on the first, HISTORY
    newer ones on the second, and a few of the newest on each of OTHER_DEVICES more."""
    await _insert_user(connection, user_id)

    others = [uuid.uuid4() for _ in range(OTHER_DEVICES)]
    await connection.copy_records_to_table(
        "smsdevice",
        records=[
            (device_id, user_id, f"phone {number}", device_id.hex, "sk_test")
            for number, device_id in enumerate([*devices, *others])
        ],
        columns=("id", "user_id", "name", "api_key_hash", "api_key_prefix"),
    )

    owners = [devices[index // HISTORY] for index in range(2 * HISTORY)]
    owners += [device for device in others for _ in range(OTHER_DEVICE_MESSAGES)]
    start = datetime(2025, 1, 1, tzinfo=UTC)
    at = [start + timedelta(seconds=index) for index in range(len(owners))]
    await connection.copy_records_to_table(
        "smsmessage",
        records=[
            (
                uuid.uuid4(),
                user_id,
                device_id,
                "outgoing",
                "delivered",
                NUMBER,
                "hola",
                created_at,
                created_at,
            )
            for device_id, created_at in zip(owners, at, strict=True)
        ],
        columns=(
            "id",
            "user_id",
            "device_id",
            "type",
            "status",
            "to_number",
            "body",
            "created_at",
            "updated_at",
        ),
    )

    await connection.execute("ANALYZE smsmessage")
    await connection.execute("SET LOCAL enable_seqscan = off")


async def test_device_filter_reads_one_page(pg_connection: asyncpg.Connection) -> None:
    user_id = uuid.uuid4()
    devices = [uuid.uuid4(), uuid.uuid4()]
    statement = listing_statement(
        user_id,
        MessageFilters(device_id=devices[0]),
        after=None,
        descending=True,
        limit=PAGE + 1,
    )

    plan = await generic_plan(
        pg_connection,
        statement,
        lambda connection: _insert_devices(connection, user_id, devices),
    )

    assert rows_read(plan, "smsmessage") <= PAGE + 1


async def _insert_branch_history(
    session_factory: async_sessionmaker[AsyncSession], user: ApiUser
) -> list[SMSMessage]:
    """Insert messages of several statuses to, from, or to and from NUMBER, several
    of them sharing a created_at; return them."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    other = "+34699999999"
    shapes = [
        (MessageStatus.FAILED, NUMBER, None),
        (MessageStatus.DELIVERED, NUMBER, NUMBER),
        (MessageStatus.FAILED, other, NUMBER),
        (MessageStatus.DELIVERED, other, None),
        (MessageStatus.SENT, NUMBER, NUMBER),
        (MessageStatus.DELIVERED, None, NUMBER),
    ]
    messages = []
    for index in range(24):
        status, to_number, from_number = shapes[index % len(shapes)]
        messages.append(
            SMSMessage(
                user_id=user.id,
                type=MessageType.OUTGOING,
                status=status,
                to_number=to_number,
                from_number=from_number,
                body="hola",
                # Two messages at each instant, so that pages of 3 split ties.
                created_at=start + timedelta(minutes=index // 2),
            )
        )
    async with session_factory() as session:
        session.add_all(messages)
        await session.commit()
    return messages


def _matches(
    message: SMSMessage,
    statuses: set[str],
    phone: str | None,
    dates: tuple[datetime, datetime] | None,
) -> bool:
    if statuses and message.status.value not in statuses:
        return False
    if phone is not None and phone not in (message.to_number, message.from_number):
        return False
    return dates is None or dates[0] <= message.created_at <= dates[1]


async def _walk_listing(
    client: AsyncClient, user: ApiUser, params: list[tuple[str, str]]
) -> list[str]:
    """Follow next_cursor from the first page to the last; return the ids in order."""
    listed: list[str] = []
    cursor = None
    for _ in range(100):
        request = [*params, *([("cursor", cursor)] if cursor else [])]
        response = await client.get(MESSAGES_URL, params=request, headers=user.headers)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        listed.extend(item["id"] for item in data["items"])
        cursor = data["next_cursor"]
        if cursor is None:
            return listed
    raise AssertionError(f"the listing never ended: {params}")


async def test_branches_page_in_order(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    messages = await _insert_branch_history(session_factory, user)
    dates = (
        datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 8, tzinfo=UTC),
    )
    cases: list[tuple[list[str], str | None, tuple[datetime, datetime] | None]] = [
        (["failed", "delivered"], NUMBER, None),
        (["failed", "failed"], NUMBER, None),
        (["delivered", "delivered"], None, None),
        ([], NUMBER, None),
        (["delivered", "failed"], NUMBER, dates),
    ]

    for statuses, phone, bounds in cases:
        params = [("status", status) for status in statuses]
        if phone is not None:
            params.append(("phone", phone))
        if bounds is not None:
            params.append(("date_from", bounds[0].isoformat()))
            params.append(("date_to", bounds[1].isoformat()))
        matching = [
            message
            for message in messages
            if _matches(message, set(statuses), phone, bounds)
        ]
        ordered = sorted(matching, key=lambda message: (message.created_at, message.id))
        expected = [str(message.id) for message in ordered]
        assert expected, statuses

        for order in ("asc", "desc"):
            listed = await _walk_listing(
                client, user, [*params, ("limit", "3"), ("order", order)]
            )

            expected_order = expected if order == "asc" else expected[::-1]
            assert listed == expected_order, (statuses, phone, bounds, order)
