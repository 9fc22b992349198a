"""Raw Redis and Postgres baselines, measured in the orchestrator before any service runs.

They use the clients the services use (redis-py asyncio with hiredis, asyncpg) and the
same payloads: a new-message stream entry, and a row with the columns the API inserts
into a copy of `smsmessage` with the same indexes and foreign keys, owned by real users.
"""

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.typing import EncodableT

from bench import pg
from bench.stats import summarize_ms
from mensajero_common import queues

RAW_TABLE = "bench_raw_message"
# The same table without the foreign keys, for the batch figure's second baseline.
RAW_TABLE_WITHOUT_KEYS = "bench_raw_message_without_keys"
BODY = "Benchmark message: your code is 123456"
_INSERT = (
    f"INSERT INTO {RAW_TABLE} (id, user_id, type, status, to_number, body, segments, "
    "encoding, meta) VALUES ($1, $2, 'outgoing', 'pending', $3, $4, 1, 'gsm7', '{}')"
)
_COLUMNS = (
    "id",
    "user_id",
    "type",
    "status",
    "to_number",
    "body",
    "segments",
    "encoding",
    "bulk_id",
)


@dataclass(frozen=True)
class RawOwner:
    """The users and the bulk task that the baseline rows belong to, as the API's do.

    Single rows are spread over the users like the benchmark's sends, because each
    insert locks its user's row for its foreign key check. The bulk task belongs to the
    first user.
    """

    user_ids: tuple[uuid.UUID, ...]
    bulk_id: uuid.UUID

    @property
    def bulk_user_id(self) -> uuid.UUID:
        return self.user_ids[0]


def message_row(
    user_id: uuid.UUID, number: int, bulk_id: uuid.UUID | None = None
) -> tuple[Any, ...]:
    return (
        uuid.uuid4(),
        user_id,
        "outgoing",
        "pending",
        f"+3460{number % 10_000_000:07d}",
        BODY,
        1,
        "gsm7",
        bulk_id,
    )


# Redis.


def new_message_entry() -> dict[EncodableT, EncodableT]:
    """Return a new-message entry as the API writes it for a single send of BODY."""
    return queues.new_message_fields(
        queues.NewMessage(
            id=uuid.uuid4(),
            user_id=uuid.uuid4(),
            requested_device_id=None,
            to_number="+34600000001",
            body=BODY,
            segments=1,
            encoding="gsm7",
            created_at=datetime.now(UTC),
            expires_at=None,
        )
    )


async def redis_xadd_rate(
    redis_url: str, stream: str, concurrency: int, duration_s: float
) -> dict[str, Any]:
    """XADD new-message entries from `concurrency` callers for `duration_s`."""
    redis: Redis = Redis.from_url(redis_url, max_connections=concurrency)
    count = 0
    stop_at = time.monotonic() + duration_s

    async def writer() -> None:
        nonlocal count
        while time.monotonic() < stop_at:
            await redis.xadd(
                stream,
                new_message_entry(),
                maxlen=queues.NEW_MESSAGES_STREAM_MAXLEN,
                approximate=True,
            )
            count += 1

    try:
        await asyncio.gather(*(writer() for _ in range(concurrency)))
    finally:
        await redis.delete(stream)
        await redis.aclose()
    return {"rate_per_s": round(count / duration_s, 1), "count": count}


async def redis_xadd_to_reader_latency(
    redis_url: str, stream: str, samples: int
) -> dict[str, Any]:
    """Time from XADD to a reader blocked in XREAD receiving the entry, one at a time."""
    writer: Redis = Redis.from_url(redis_url)
    reader: Redis = Redis.from_url(redis_url)
    latencies_ms: list[float] = []
    try:
        last_id = await writer.xadd(stream, {"message_id": "start"})
        for _ in range(samples):
            read = asyncio.create_task(
                reader.xread({stream: last_id}, count=1, block=5000)
            )
            # Let the XREAD reach Redis and block before the entry is added.
            await asyncio.sleep(0.002)
            sent_at = time.perf_counter()
            await writer.xadd(stream, new_message_entry())
            response = await read
            latencies_ms.append((time.perf_counter() - sent_at) * 1000)
            last_id = response[0][1][-1][0]
    finally:
        await writer.delete(stream)
        await writer.aclose()
        await reader.aclose()
    return {"latency_ms": summarize_ms(latencies_ms)}


# Postgres.


async def create_raw_table(dsn: str, users: int) -> RawOwner:
    """Create the baseline tables, and the users and bulk task that own their rows.

    LIKE copies columns, defaults and indexes but no foreign key, so those of
    `smsmessage` are added to RAW_TABLE: Postgres checks each of them on every row the
    API inserts (about 7 ms for 1000 rows on the benchmark machine).
    """
    owner = RawOwner(
        user_ids=tuple(uuid.uuid4() for _ in range(users)), bulk_id=uuid.uuid4()
    )
    connection = await pg.connect(dsn)
    try:
        for table in (RAW_TABLE, RAW_TABLE_WITHOUT_KEYS):
            await connection.execute(f"DROP TABLE IF EXISTS {table}")
            await connection.execute(
                f"CREATE TABLE {table} (LIKE smsmessage INCLUDING ALL)"
            )
        foreign_keys = await connection.fetch(
            "SELECT conname, pg_get_constraintdef(oid) AS definition "
            "FROM pg_constraint "
            "WHERE conrelid = 'smsmessage'::regclass AND contype = 'f'"
        )
        for key in foreign_keys:
            await connection.execute(
                f'ALTER TABLE {RAW_TABLE} ADD CONSTRAINT "raw_{key["conname"]}" '
                f"{key['definition']}"
            )
        await connection.executemany(
            'INSERT INTO "user" (id, email, hashed_password) VALUES ($1, $2, $3)',
            [
                (user_id, f"raw-{user_id}@example.com", "not a password hash")
                for user_id in owner.user_ids
            ],
        )
        await connection.execute(
            "INSERT INTO smsbulktask (id, user_id, total_recipients, message_ids) "
            "VALUES ($1, $2, 0, '{}')",
            owner.bulk_id,
            owner.bulk_user_id,
        )
    finally:
        await connection.close()
    return owner


async def postgres_insert_commit_rate(
    dsn: str, owner: RawOwner, pool_size: int, duration_s: float
) -> dict[str, Any]:
    """Single-row INSERT + COMMIT from `pool_size` connections for `duration_s`."""
    pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
    count = 0
    stop_at = time.monotonic() + duration_s

    async def worker(index: int) -> None:
        nonlocal count
        user_id = owner.user_ids[index % len(owner.user_ids)]
        async with pool.acquire() as connection:
            while time.monotonic() < stop_at:
                row = message_row(user_id, count)
                async with connection.transaction():
                    await connection.execute(_INSERT, row[0], row[1], row[4], row[5])
                count += 1

    try:
        await asyncio.gather(*(worker(index) for index in range(pool_size)))
    finally:
        await pool.close()
    return {"rate_per_s": round(count / duration_s, 1), "count": count}


async def postgres_commit_latency(
    dsn: str, owner: RawOwner, samples: int
) -> dict[str, Any]:
    """Latency of one INSERT + COMMIT on an idle connection, one after another."""
    connection = await pg.connect(dsn)
    user_id = owner.bulk_user_id
    latencies_ms: list[float] = []
    try:
        for number in range(samples):
            row = message_row(user_id, number)
            started = time.perf_counter()
            async with connection.transaction():
                await connection.execute(_INSERT, row[0], row[1], row[4], row[5])
            latencies_ms.append((time.perf_counter() - started) * 1000)
    finally:
        await connection.close()
    return {"latency_ms": summarize_ms(latencies_ms)}


async def postgres_batch_insert(
    dsn: str, owner: RawOwner, rows: int, repeats: int
) -> dict[str, Any]:
    """Milliseconds to insert `rows` rows of one bulk task in one transaction: by COPY
    and by executemany, and by COPY into the table without foreign keys."""
    connection = await pg.connect(dsn)
    timings_ms: dict[str, list[float]] = {
        "copy_ms": [],
        "executemany_ms": [],
        "copy_without_foreign_keys_ms": [],
    }
    try:
        for _ in range(repeats):
            for name, table in (
                ("copy_ms", RAW_TABLE),
                ("copy_without_foreign_keys_ms", RAW_TABLE_WITHOUT_KEYS),
            ):
                batch = _batch(owner, rows)
                started = time.perf_counter()
                async with connection.transaction():
                    await connection.copy_records_to_table(
                        table, records=batch, columns=_COLUMNS
                    )
                timings_ms[name].append((time.perf_counter() - started) * 1000)

            batch = _batch(owner, rows)
            started = time.perf_counter()
            async with connection.transaction():
                await connection.executemany(
                    _INSERT, [(row[0], row[1], row[4], row[5]) for row in batch]
                )
            timings_ms["executemany_ms"].append((time.perf_counter() - started) * 1000)
    finally:
        await connection.close()
    return {name: summarize_ms(values) for name, values in timings_ms.items()}


def _batch(owner: RawOwner, rows: int) -> list[tuple[Any, ...]]:
    return [
        message_row(owner.bulk_user_id, number, owner.bulk_id) for number in range(rows)
    ]


async def drop_raw_table(dsn: str, owner: RawOwner) -> None:
    connection = await pg.connect(dsn)
    try:
        for table in (RAW_TABLE, RAW_TABLE_WITHOUT_KEYS):
            await connection.execute(f"DROP TABLE IF EXISTS {table}")
        # The bulk task goes with its user (ON DELETE CASCADE).
        await connection.execute(
            'DELETE FROM "user" WHERE id = ANY($1::uuid[])', list(owner.user_ids)
        )
    finally:
        await connection.close()
