"""Queries on bulk tasks and their messages, always scoped to the owning user."""

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common import message_attempts
from mensajero_common.db import driver_connection
from mensajero_common.models import MessageStatus, SMSBulkTask, SMSMessage


async def insert_task(session: AsyncSession, values: dict[str, Any]) -> bool:
    """Insert a bulk task; return False if its idempotency key is taken.

    Like a single send, a concurrent insert with the same key waits for the first
    transaction, so two requests with one key never both create a task. Only the id
    comes back, because the caller has every other value already.
    """
    statement = (
        pg_insert(SMSBulkTask)
        .values(**values)
        .on_conflict_do_nothing(
            index_elements=[SMSBulkTask.user_id, SMSBulkTask.idempotency_key],
            index_where=SMSBulkTask.idempotency_key.is_not(None),
        )
        .returning(SMSBulkTask.id)
    )
    return (await session.scalars(statement)).one_or_none() is not None


async def complete_task(
    session: AsyncSession,
    task_id: uuid.UUID,
    message_ids: list[uuid.UUID],
    rejected: list[dict[str, Any]],
) -> None:
    """Store the ids of a task's messages and its rejections, known once all are read."""
    statement = (
        update(SMSBulkTask)
        .where(SMSBulkTask.id == task_id)
        .values(message_ids=message_ids, rejected=rejected)
        .execution_options(synchronize_session=False)
    )
    await session.execute(statement)


@dataclass
class MessageColumns:
    """Column values of some of a bulk send's messages, one list item per message.

    Each message has its own id and number. The other columns of a shared-body send are
    the same for all of its messages, and `shared` contains them, by column name.
    """

    shared: dict[str, Any]
    ids: list[uuid.UUID] = field(default_factory=list)
    to_numbers: list[str] = field(default_factory=list)
    # Empty when the body is in `shared`.
    bodies: list[str] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    encodings: list[str] = field(default_factory=list)


# The columns of a message that are the same for every message of a bulk send, with
# their types.
_SHARED_TYPES = {
    "user_id": "uuid",
    "type": "text",
    "status": "text",
    "device_id": "uuid",
    "requested_device_id": "uuid",
    "expires_at": "timestamptz",
    "bulk_id": "uuid",
}
# The columns of the body, shared or not.
_BODY_TYPES = {"body": "text", "segments": "int4", "encoding": "text"}


def _insert_statement(shared_body: bool) -> str:
    """Build the INSERT of messages whose own values come as one array per column.

    Where only the id and the number differ, the arrays cost Postgres the same as a COPY
    of the rows (15.5 ms for 1000, measured on the benchmark machine). Each constant
    column given as an array adds to that, so the shared values come once each.
    """
    own = {"id": "uuid", "to_number": "text"}
    shared = dict(_SHARED_TYPES)
    if shared_body:
        shared.update(_BODY_TYPES)
    else:
        own.update(_BODY_TYPES)
    arrays = ", ".join(
        f"${number}::{column_type}[]"
        for number, column_type in enumerate(own.values(), 1)
    )
    scalars = ", ".join(
        f"${number}::{column_type}"
        for number, column_type in enumerate(shared.values(), len(own) + 1)
    )
    return (
        f"INSERT INTO {SMSMessage.__tablename__} "
        f"({', '.join(own)}, {', '.join(shared)}) "
        f"SELECT message.*, {scalars} "
        f"FROM unnest({arrays}) AS message({', '.join(own)})"
    )


_INSERT_SHARED_BODY = _insert_statement(shared_body=True)
_INSERT_OWN_BODIES = _insert_statement(shared_body=False)
SHARED_COLUMNS = tuple(_SHARED_TYPES)
BODY_COLUMNS = tuple(_BODY_TYPES)
_SHARED_BODY_COLUMNS = (*SHARED_COLUMNS, *BODY_COLUMNS)


class MessageWriter:
    """Inserter of many messages in the session's transaction, one chunk at a time.

    `write` sends a chunk's INSERT and returns without waiting for Postgres, so the
    caller can validate the next chunk while Postgres inserts this one. At most one
    INSERT is in flight: the next `write`, `flush` or `settle` waits for it.
    """

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection
        self._in_flight: asyncio.Task[str] | None = None

    @classmethod
    async def open(cls, session: AsyncSession) -> "MessageWriter":
        return cls(await driver_connection(session))

    async def write(self, columns: MessageColumns) -> None:
        """Send the INSERT of the messages in `columns`."""
        await self.flush()
        if columns.bodies:
            statement = _INSERT_OWN_BODIES
            arguments = [
                columns.ids,
                columns.to_numbers,
                columns.bodies,
                columns.segments,
                columns.encodings,
                *(columns.shared[name] for name in SHARED_COLUMNS),
            ]
        else:
            statement = _INSERT_SHARED_BODY
            arguments = [
                columns.ids,
                columns.to_numbers,
                *(columns.shared[name] for name in _SHARED_BODY_COLUMNS),
            ]
        self._in_flight = asyncio.create_task(
            self._connection.execute(statement, *arguments)
        )
        # One turn of the event loop lets the task write the statement to the socket
        # (asyncpg needs no round trip before it once the statement is prepared).
        await asyncio.sleep(0)

    async def flush(self) -> None:
        """Wait for the INSERT in flight, and raise its error if it failed."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            await in_flight

    async def settle(self) -> None:
        """Wait for the INSERT in flight and ignore its outcome, before a rollback.

        The connection cannot take the rollback while a statement is still running.
        """
        with contextlib.suppress(Exception):
            await self.flush()


async def get_task(
    session: AsyncSession, user_id: uuid.UUID, task_id: uuid.UUID
) -> SMSBulkTask | None:
    statement = select(SMSBulkTask).where(
        SMSBulkTask.id == task_id, SMSBulkTask.user_id == user_id
    )
    return (await session.scalars(statement)).one_or_none()


async def get_task_by_idempotency_key(
    session: AsyncSession, user_id: uuid.UUID, idempotency_key: str
) -> SMSBulkTask | None:
    statement = select(SMSBulkTask).where(
        SMSBulkTask.user_id == user_id, SMSBulkTask.idempotency_key == idempotency_key
    )
    return (await session.scalars(statement)).one_or_none()


async def count_by_status(
    session: AsyncSession, user_id: uuid.UUID, task_id: uuid.UUID
) -> dict[MessageStatus, int]:
    statement = (
        select(SMSMessage.status, func.count())
        .where(SMSMessage.bulk_id == task_id, SMSMessage.user_id == user_id)
        .group_by(SMSMessage.status)
    )
    rows = (await session.execute(statement)).all()
    return {MessageStatus(status): count for status, count in rows}


async def list_unclaimed_ids(
    session: AsyncSession, user_id: uuid.UUID, task_id: uuid.UUID
) -> list[uuid.UUID]:
    """Return the ids of the task's messages that no phone has claimed, in id order.

    They are read without a lock, so the caller locks them and checks them again.
    """
    statement = (
        select(SMSMessage.id)
        .where(
            SMSMessage.bulk_id == task_id,
            SMSMessage.user_id == user_id,
            SMSMessage.status.in_(
                [status.value for status in message_attempts.UNCLAIMED_STATUSES]
            ),
        )
        .order_by(SMSMessage.id)
    )
    return list((await session.scalars(statement)).all())
