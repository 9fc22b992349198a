"""Engine and session factories for Postgres (asyncpg)."""

import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from enum import StrEnum
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import (
    ColumnElement,
    SQLColumnExpression,
    event,
    exc,
    literal_column,
    text,
)
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, make_transient_to_detached

from mensajero_common.settings import Settings


def create_engine(
    settings: Settings,
    *,
    pool_size: int | None = None,
    application_name: str = "mensajero",
) -> AsyncEngine:
    """Create the engine; `pool_size` defaults to DATABASE_POOL_SIZE.

    Each connection carries `application_name` (the service's name), so that
    `pg_stat_activity` and the server's logs tell which service holds or runs what.

    Opening a connection fails after DATABASE_CONNECT_TIMEOUT_S, and a statement after
    DATABASE_COMMAND_TIMEOUT_S, with TimeoutError, which is_transient counts as an
    unavailable Postgres. A pooled connection that Postgres or the network has closed
    is replaced when it is checked out (see `_replace_closed_connection`). One that
    breaks while in use fails that transaction, and SQLAlchemy then discards every idle
    connection of the pool.
    """
    engine = create_async_engine(
        settings.DATABASE_URL,
        pool_size=pool_size or settings.DATABASE_POOL_SIZE,
        max_overflow=settings.DATABASE_MAX_OVERFLOW,
        # pool_pre_ping would cost three round trips (BEGIN, a ping, ROLLBACK) on every
        # checkout; asyncpg already marks a connection closed when the server closes its socket.
        pool_pre_ping=False,
        connect_args={
            "server_settings": {"application_name": application_name},
            "timeout": settings.DATABASE_CONNECT_TIMEOUT_S,
            "command_timeout": settings.DATABASE_COMMAND_TIMEOUT_S,
        },
    )
    event.listen(engine.sync_engine.pool, "checkout", _replace_closed_connection)
    return engine


def _replace_closed_connection(
    dbapi_connection: Any, connection_record: Any, connection_proxy: Any
) -> None:
    """Reject a pooled connection whose socket asyncpg has seen close.

    Raising DisconnectionError makes the pool discard it and check out (or open)
    another, up to three times. A Postgres restart or a terminated backend closes the
    socket, so this catches them without a round trip.
    """
    if dbapi_connection.driver_connection.is_closed():
        raise exc.DisconnectionError("the pooled connection was closed")


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def session_scope(
    factory: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """Open a session that commits on success and rolls back on any exception."""
    async with factory() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        else:
            await session.commit()


async def driver_connection(
    session: AsyncSession, *, transaction: bool = True
) -> asyncpg.Connection:
    """Return the asyncpg connection under `session`, for statements sent on it directly.

    For the few statements on the hottest paths, where building and running them through
    SQLAlchemy costs several times the round trip. They run on the session's connection,
    inside its transaction, and the session's commit or rollback ends them. With
    `transaction=False` and no transaction begun yet, each statement commits on its own
    (a read, or one statement that must be atomic by itself), which saves the BEGIN and
    COMMIT round trips.
    """
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver: asyncpg.Connection = raw.driver_connection
    if transaction and not driver.is_in_transaction():
        # SQLAlchemy's asyncpg adapter sends BEGIN with the session's first statement.
        await session.execute(text("SELECT 1"))
    return driver


def sql_literal(value: StrEnum) -> ColumnElement[str]:
    """Return an enum value written into the SQL instead of bound.

    Postgres may cache a generic plan of a prepared statement after five runs, made
    without the bound values. Such a plan can use a partial index whose predicate names
    a status only when the statement writes that status itself.
    """
    return literal_column(f"'{value.value}'")


def literal_in(
    column: SQLColumnExpression[Any], values: Iterable[StrEnum]
) -> ColumnElement[bool]:
    """Return `column IN (…)` with `values` written into the SQL (see sql_literal)."""
    return column.in_([sql_literal(value) for value in values])


# Seconds allowed to a delete whose foreign keys set NULL on, or delete, every row of a
# long history: a device's messages and attempts, or a webhook's deliveries. With a
# million messages such a delete took 20 s on a 2-core machine, which
# DATABASE_COMMAND_TIMEOUT_S would cut off on every try.
CASCADING_DELETE_TIMEOUT_S = 600.0


async def delete_owned_row(
    session: AsyncSession,
    model: type[DeclarativeBase],
    row_id: uuid.UUID,
    user_id: uuid.UUID,
) -> bool:
    """Delete the row of `model` with this id and owner; tell whether it existed.

    For a device or a webhook, whose foreign keys set NULL on, or delete, a whole
    history: the statement gets CASCADING_DELETE_TIMEOUT_S instead of
    DATABASE_COMMAND_TIMEOUT_S.
    """
    table = model.__table__.name  # type: ignore[attr-defined]
    connection = await driver_connection(session)
    deleted = await connection.fetchval(
        f"DELETE FROM {table} WHERE id = $1 AND user_id = $2 RETURNING id",
        row_id,
        user_id,
        timeout=CASCADING_DELETE_TIMEOUT_S,
    )
    return deleted is not None


Model = TypeVar("Model", bound=DeclarativeBase)


def column_list(model: type[DeclarativeBase], alias: str = "") -> str:
    """Return the SQL list of `model`'s columns, each prefixed with `alias.` if given.

    With an alias, each column is also named `<alias>_<column>` in the result.
    """
    columns = [column.key for column in model.__table__.columns]
    if not alias:
        return ", ".join(columns)
    return ", ".join(f"{alias}.{column} AS {alias}_{column}" for column in columns)


def attach_loaded(
    session: AsyncSession,
    model: type[Model],
    row: Mapping[str, Any],
    alias: str = "",
) -> Model:
    """Return the instance of `model` that `row` holds, joined to `session` as if loaded.

    For rows read by driver_connection: the instance is persistent, so changes to it
    are saved on commit. An instance already in the session is returned as it is.
    `alias` strips the `<alias>_` prefix of column_list(model, alias).
    """
    prefix = f"{alias}_" if alias else ""
    values = {
        column.key: row[prefix + column.key] for column in model.__table__.columns
    }
    identity = session.identity_key(model, values["id"])
    existing = session.identity_map.get(identity)
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    instance = model(**values)
    make_transient_to_detached(instance)
    session.add(instance)
    return instance
