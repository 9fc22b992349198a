"""Which failures count as Postgres or Redis being unavailable (mensajero_common.transient)."""

import uuid

import asyncpg
import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, settings_without_connections
from mensajero_common.transient import is_transient


async def _error_of(awaitable: object) -> BaseException:
    try:
        await awaitable  # type: ignore[misc]
    except Exception as error:
        return error
    raise AssertionError("expected an error")


async def test_is_transient_for_a_missing_database(settings: Settings) -> None:
    url = make_url(settings.DATABASE_URL)
    missing = f"mensajero_test_missing_{uuid.uuid4().hex[:8]}"

    error = await _error_of(
        asyncpg.connect(
            host=url.host, port=url.port, user=url.username, database=missing
        )
    )

    assert isinstance(error, asyncpg.InvalidCatalogNameError)
    assert is_transient(error)


async def test_is_transient_for_a_role_out_of_connections(settings: Settings) -> None:
    async with settings_without_connections(settings) as limited:
        url = make_url(limited.DATABASE_URL)
        error = await _error_of(
            asyncpg.connect(
                host=url.host, port=url.port, user=url.username, database=url.database
            )
        )

    assert isinstance(error, asyncpg.TooManyConnectionsError)
    assert is_transient(error)


async def test_is_transient_for_a_terminated_connection_through_sqlalchemy(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as connection:
        pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with engine.connect() as other:
            await other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        error = await _error_of(connection.execute(text("SELECT 1")))
        await connection.invalidate()

    assert isinstance(error, DBAPIError)
    assert is_transient(error)


async def test_is_transient_false_for_division_by_zero(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as connection:
        error = await _error_of(connection.execute(text("SELECT 1 / 0")))

    assert isinstance(error, DBAPIError)
    assert not is_transient(error)


async def test_is_transient_for_unreachable_redis() -> None:
    # Nothing listens on this loopback port.
    client = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    try:
        error = await _error_of(client.ping())
    finally:
        await client.aclose()

    assert is_transient(error)


@pytest.mark.parametrize("error", [ValueError("bad"), KeyError("id"), RuntimeError()])
def test_is_transient_false_for_other_errors(error: Exception) -> None:
    assert not is_transient(error)


def test_is_transient_follows_the_cause() -> None:
    try:
        try:
            raise ConnectionResetError("peer went away")
        except ConnectionResetError as reset:
            raise RuntimeError("while reading the user") from reset
    except RuntimeError as error:
        assert is_transient(error)
