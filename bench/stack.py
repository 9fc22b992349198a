"""The benchmark's own database, Redis key prefix, service processes and seed data.

The run creates database `mensajero_bench` (dropping one left by a crashed run), uses
Redis DB 12 with a random key prefix, and removes both at the end. Rate limits, device
pacing and frame limits are raised far above what the run sends, and every user is on the
Enterprise plan, so that no quota or anti-abuse limit caps a figure.
"""

import asyncio
import contextlib
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

from bench import pg
from bench.procs import Proc, Processes, wait_healthy
from mensajero_common.apikeys import display_prefix, generate_api_key, hash_api_key
from mensajero_common.keys import RedisKeys
from mensajero_common.migrate import create_database_if_missing, upgrade
from mensajero_common.testing import free_port

POSTGRES_SERVER = os.environ.get(
    "BENCH_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432"
)
REDIS_SERVER = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "12"))
DATABASE = "mensajero_bench"
PASSWORD = "bench-password-not-secret"
SUPERUSER = "bench-admin@example.com"
DEVICE_KEY_PREFIX = "mdk_"
ENTERPRISE_PLAN = "enterprise"

# Limits meant against abuse, raised so that they do not cap the run. The request rate
# limits keep two windows each, as the defaults do, so that a send pays for the same
# rate-limit work as on a default install.
UNLIMITED_ENVIRONMENT = {
    "RATE_LIMIT_PER_USER": "10000000/second;100000000/minute",
    "RATE_LIMIT_PER_API_KEY": "10000000/second;100000000/minute",
    "RATE_LIMIT_PER_IP": "10000000/second;100000000/minute",
    "RATE_LIMIT_LOGIN_PER_IP": "1000000/minute",
    "LOGIN_FAILURES_PER_IP": "1000000/minute",
    "DEVICE_SMS_PER_MINUTE": "10000000",
    "DEVICE_FRAMES_PER_SECOND": "1000000",
    "WEBHOOK_ALLOW_PRIVATE_URLS": "true",
}


@dataclass
class BenchData:
    database_url: str = f"{POSTGRES_SERVER}/{DATABASE}"
    redis_url: str = f"{REDIS_SERVER}/{REDIS_DB}"
    prefix: str = field(default_factory=lambda: f"bench:{uuid.uuid4().hex[:10]}")

    @property
    def dsn(self) -> str:
        return self.database_url.replace("+asyncpg", "")

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.prefix)


# Postgres connections the stack's pools may open (API 20, hub 30, dispatcher 20,
# webhook-sender 20 at DATABASE_POOL_SIZE 20), and a few of the benchmark's own.
STACK_DB_CONNECTIONS = 95
ADMIN_DSN = POSTGRES_SERVER.replace("+asyncpg", "") + "/postgres"


async def connection_slots_warning() -> str | None:
    """Return a warning when Postgres has fewer free connections than the stack may
    open, since requests then fail with "too many clients already"."""
    maximum, free = await pg.free_connection_slots(ADMIN_DSN)
    if free >= STACK_DB_CONNECTIONS:
        return None
    return (
        f"Postgres has {free} of its {maximum} connections free and the stack may open "
        f"{STACK_DB_CONNECTIONS}; requests that find none fail with "
        '"too many clients already" and count as non-2xx answers'
    )


async def _drop_database() -> None:
    connection = await pg.connect(ADMIN_DSN)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    finally:
        await connection.close()


async def prepare_database(data: BenchData) -> None:
    await _drop_database()
    await create_database_if_missing(data.database_url)
    # Alembic's env runs its own event loop, so it goes to a thread.
    await asyncio.to_thread(upgrade, data.database_url)


async def cleanup(data: BenchData) -> None:
    """Drop the database and delete the run's Redis keys (and arq's job keys on DB 12)."""
    with contextlib.suppress(OSError, asyncpg.PostgresError):
        await _drop_database()
    redis: Redis = Redis.from_url(data.redis_url)
    try:
        for pattern in (f"{data.prefix}:*", "arq:*"):
            async for key in redis.scan_iter(match=pattern, count=1000):
                await redis.delete(key)
    finally:
        await redis.aclose()


def service_environment(data: BenchData, **overrides: Any) -> dict[str, str]:
    variables = {
        "ENVIRONMENT": "test",
        "DATABASE_URL": data.database_url,
        "REDIS_URL": data.redis_url,
        "REDIS_KEY_PREFIX": data.prefix,
        "SECRET_KEY": "bench-secret-key-that-is-long-enough-for-hs256",
        "FIRST_SUPERUSER": SUPERUSER,
        "FIRST_SUPERUSER_PASSWORD": PASSWORD,
        "LOG_JSON": "true",
        "LOG_LEVEL": "INFO",
        "API_HOST": "127.0.0.1",
        "HUB_HOST": "127.0.0.1",
        "OPS_HOST": "127.0.0.1",
        **UNLIMITED_ENVIRONMENT,
    }
    variables.update({name: str(value) for name, value in overrides.items()})
    return {**os.environ, **variables}


@dataclass
class Stack:
    api: Proc
    hub: Proc
    dispatcher: Proc
    webhooks: Proc
    api_port: int
    hub_port: int
    env: dict[str, str]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def hub_ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.hub_port}/api/v1/android/ws"

    def services(self) -> list[Proc]:
        return [self.api, self.hub, self.dispatcher, self.webhooks]


async def start_stack(processes: Processes, data: BenchData) -> Stack:
    api_port, hub_port = free_port(), free_port()
    dispatcher_ops, webhooks_ops = free_port(), free_port()
    env = service_environment(
        data,
        API_PORT=api_port,
        HUB_PORT=hub_port,
        DISPATCHER_OPS_PORT=dispatcher_ops,
        WEBHOOKS_OPS_PORT=webhooks_ops,
    )
    api = await processes.start_service("api", "mensajero-api", env)
    hub = await processes.start_service("hub", "mensajero-hub", env)
    dispatcher = await processes.start_service(
        "dispatcher", "mensajero-dispatcher", env
    )
    webhooks = await processes.start_service("webhooks", "mensajero-webhooks", env)
    await wait_healthy(f"http://127.0.0.1:{api_port}/healthz", api)
    await wait_healthy(f"http://127.0.0.1:{hub_port}/healthz", hub)
    await wait_healthy(f"http://127.0.0.1:{dispatcher_ops}/healthz", dispatcher)
    await wait_healthy(f"http://127.0.0.1:{webhooks_ops}/healthz", webhooks)
    return Stack(api, hub, dispatcher, webhooks, api_port, hub_port, env)


async def start_extra_hub(
    processes: Processes, data: BenchData, name: str, **overrides: Any
) -> tuple[Proc, int]:
    """Start one more device-hub process on the run's database and prefix."""
    port = free_port()
    env = service_environment(data, HUB_PORT=port, **overrides)
    hub = await processes.start_service(name, "mensajero-hub", env)
    await wait_healthy(f"http://127.0.0.1:{port}/healthz", hub)
    return hub, port


# Seed data.


@dataclass
class BenchUser:
    email: str
    user_id: uuid.UUID
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _check(response: httpx.Response, action: str) -> dict[str, Any]:
    if response.status_code >= 300:
        raise RuntimeError(f"{action} failed: {response.status_code} {response.text}")
    body: dict[str, Any] = response.json()
    return body


async def login(client: httpx.AsyncClient, email: str) -> str:
    response = await client.post(
        "/api/v1/login/access-token", data={"username": email, "password": PASSWORD}
    )
    return str(_check(response, f"login of {email}")["access_token"])


async def create_users(
    client: httpx.AsyncClient, dsn: str, label: str, count: int
) -> list[BenchUser]:
    """Sign up `count` users through the API, log them in and put them on Enterprise."""
    admin_token = await login(client, SUPERUSER)
    users = []
    for index in range(count):
        email = f"{label}-{index}-{uuid.uuid4().hex[:6]}@example.com"
        response = await client.post(
            "/api/v1/users/signup", json={"email": email, "password": PASSWORD}
        )
        user_id = uuid.UUID(_check(response, f"sign-up of {email}")["data"]["id"])
        users.append(BenchUser(email, user_id, await login(client, email)))

    for user in users:
        response = await client.put(
            "/api/v1/sms/quota/upgrade",
            json={"user_id": str(user.user_id), "plan": ENTERPRISE_PLAN},
            headers={"Authorization": f"Bearer {admin_token}"},
        )
        if response.status_code >= 300:
            await _upgrade_in_database(dsn, user.user_id)
    return users


async def _upgrade_in_database(dsn: str, user_id: uuid.UUID) -> None:
    connection = await pg.connect(dsn)
    try:
        await connection.execute(
            "UPDATE userquota SET plan_id = (SELECT id FROM userplan WHERE code = $1) "
            "WHERE user_id = $2",
            ENTERPRISE_PLAN,
            user_id,
        )
    finally:
        await connection.close()


async def insert_devices(
    dsn: str, owners: list[uuid.UUID], per_owner: int, label: str
) -> dict[uuid.UUID, list[str]]:
    """Insert devices straight into Postgres, as registration would; return their keys.

    Registering 50,000 phones through the API would take longer than the measurements,
    and registration is not what this benchmark measures.
    """
    keys_by_owner: dict[uuid.UUID, list[str]] = {owner: [] for owner in owners}
    records = []
    for owner in owners:
        for index in range(per_owner):
            key = generate_api_key(DEVICE_KEY_PREFIX)
            keys_by_owner[owner].append(key)
            records.append(
                (
                    uuid.uuid4(),
                    owner,
                    f"{label} {index}",
                    hash_api_key(key),
                    display_prefix(key),
                )
            )
    connection = await pg.connect(dsn)
    try:
        await connection.copy_records_to_table(
            "smsdevice",
            records=records,
            columns=("id", "user_id", "name", "api_key_hash", "api_key_prefix"),
        )
        await connection.execute(
            "UPDATE userquota SET devices_registered = devices_registered + $1 "
            "WHERE user_id = ANY($2::uuid[])",
            per_owner,
            owners,
        )
    finally:
        await connection.close()
    return keys_by_owner


# Days over which the seeded history of messages is spread.
HISTORY_DAYS = 30
HISTORY_BODY = "Your code is 000000. It expires in 10 minutes."


async def seed_history(
    dsn: str, owners: list[uuid.UUID], count: int
) -> dict[str, float]:
    """Give the owners' phones `count` delivered messages, with their attempts, spread
    over the last HISTORY_DAYS days, then VACUUM and ANALYZE; return what it took.

    A gateway in use has a message history and statistics of it. On a table that was
    just created and never analyzed, Postgres cached a plan for the hub's report batches
    that scanned the whole table once per report. That is the first minute of a new
    install, until autovacuum analyzes the table, not the steady state.
    """
    started = time.monotonic()
    connection = await pg.connect(dsn)
    try:
        devices = await connection.fetch(
            "SELECT id, user_id FROM smsdevice WHERE user_id = ANY($1::uuid[]) "
            "ORDER BY id",
            owners,
        )
        now = datetime.now(UTC)
        span_s = HISTORY_DAYS * 86_400
        messages, attempts = [], []
        for index in range(count):
            device_id, owner = devices[index % len(devices)]
            created = now - timedelta(seconds=span_s * (count - index) / count)
            sent = created + timedelta(seconds=2)
            delivered = created + timedelta(seconds=6)
            message_id = uuid.uuid4()
            messages.append(
                (
                    message_id,
                    owner,
                    device_id,
                    "outgoing",
                    "delivered",
                    f"+3467{index % 10_000_000:07d}",
                    HISTORY_BODY,
                    1,
                    created,
                    delivered,
                    created + timedelta(milliseconds=20),
                    created + timedelta(milliseconds=40),
                    sent,
                    delivered,
                )
            )
            attempts.append(
                (message_id, 1, device_id, "delivered", created, sent, delivered)
            )
        await connection.copy_records_to_table(
            "smsmessage",
            records=messages,
            columns=(
                "id",
                "user_id",
                "device_id",
                "type",
                "status",
                "to_number",
                "body",
                "attempts",
                "created_at",
                "updated_at",
                "assigned_at",
                "sending_at",
                "sent_at",
                "delivered_at",
            ),
        )
        await connection.copy_records_to_table(
            "smsmessageattempt",
            records=attempts,
            columns=(
                "message_id",
                "attempt_number",
                "device_id",
                "status",
                "started_at",
                "acknowledged_at",
                "ended_at",
            ),
        )
        copied_s = time.monotonic() - started
        # Autovacuum would have done both by now. VACUUM also sets the visibility map.
        await connection.execute("VACUUM (ANALYZE)")
    finally:
        await connection.close()
    return {
        "messages": count,
        "copy_s": round(copied_s, 2),
        "total_s": round(time.monotonic() - started, 2),
    }
