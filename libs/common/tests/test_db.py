"""The engine: its pool replaces connections that Postgres closed while they sat idle,
and its connections name their service to Postgres."""

import asyncio
from collections.abc import Coroutine
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mensajero_common.db import create_engine
from mensajero_common.settings import Settings
from mensajero_common.testing import scaled
from mensajero_common.transient import is_transient


async def _backend(engine: AsyncEngine) -> tuple[int, asyncpg.Connection]:
    """Return the backend pid of a pooled connection, and its asyncpg connection."""
    async with engine.connect() as connection:
        pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        raw = await connection.get_raw_connection()
        return pid, raw.driver_connection


async def test_pool_replaces_terminated_connection(
    settings: Settings,
) -> None:
    engine = create_engine(settings.model_copy(update={"DATABASE_POOL_SIZE": 1}))
    admin = await asyncpg.connect(settings.DATABASE_URL.replace("+asyncpg", ""))
    try:
        first, pooled = await _backend(engine)
        closed = asyncio.Event()
        pooled.add_termination_listener(lambda _: closed.set())
        # As a Postgres restart or an administrator would: the pooled connection's
        # backend goes away while the connection is idle in the pool.
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", first) is True
        # asyncpg marks the connection closed once the server's goodbye reaches it.
        await asyncio.wait_for(closed.wait(), timeout=10)

        second, _ = await _backend(engine)

        assert second != first
    finally:
        await admin.close()
        await engine.dispose()


async def test_connections_name_their_service(settings: Settings) -> None:
    engine = create_engine(settings, application_name="mensajero-dispatcher")
    try:
        async with engine.connect() as connection:
            pid = (
                await connection.execute(text("SELECT pg_backend_pid()"))
            ).scalar_one()
            name = (
                await connection.execute(
                    text(
                        "SELECT application_name FROM pg_stat_activity WHERE pid = :pid"
                    ),
                    {"pid": pid},
                )
            ).scalar_one()
    finally:
        await engine.dispose()

    assert name == "mensajero-dispatcher"


async def _failure_within(
    attempt: Coroutine[Any, Any, object], seconds: float
) -> BaseException:
    """Run `attempt` and return the error it raised within `seconds`, or fail."""
    task = asyncio.create_task(attempt)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task not in done:
        task.cancel()
        pytest.fail(f"still waiting after {seconds} s")
    error = task.exception()
    assert error is not None
    return error


async def test_silent_server_times_out(settings: Settings) -> None:
    # A server that accepts connections and never responds, as a Postgres host behind
    # a firewall that drops its packets would look.
    accepted: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    silent = settings.model_copy(
        update={
            "DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/none",
            "DATABASE_CONNECT_TIMEOUT_S": 0.5,
        }
    )
    engine = create_engine(silent)
    try:
        error = await _failure_within(_backend(engine), scaled(10))
    finally:
        await engine.dispose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()

    assert accepted
    assert is_transient(error)


async def test_slow_statement_times_out(settings: Settings) -> None:
    engine = create_engine(
        settings.model_copy(update={"DATABASE_COMMAND_TIMEOUT_S": 0.5})
    )

    async def sleep_in_postgres() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT pg_sleep(5)"))

    try:
        # Less than the statement's 5 s, so that only the command timeout can end it.
        error = await _failure_within(sleep_in_postgres(), 4)
    finally:
        await engine.dispose()

    assert is_transient(error)
