"""Queries of the assignment: lock pending messages, weigh devices, record the outcome.

Every locking query uses FOR UPDATE SKIP LOCKED, so several dispatcher replicas can work
on the same messages at once: a row another replica holds is left to that replica.
"""

import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    exists,
    func,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common.db import driver_connection, literal_in
from mensajero_common.models import (
    AttemptStatus,
    DeviceStatus,
    MessageStatus,
    MessageType,
    SMSDevice,
    SMSMessage,
)
from mensajero_dispatcher.messages.schemas import (
    Assignment,
    InFlightTask,
    OnlineDevice,
    PendingMessage,
    RequestedDevice,
)

Cursor = tuple[datetime, uuid.UUID]
# A SELECT of any columns.
AnySelect = Select[*tuple[Any, ...]]

# Statuses of a message whose task sits in its device's stream.
IN_FLIGHT_STATUSES = (MessageStatus.ASSIGNED, MessageStatus.SENDING)
_IN_FLIGHT_SQL = ", ".join(f"'{status.value}'" for status in IN_FLIGHT_STATUSES)

# Statements that take messages by id test their status on `status || ''`, which matches
# no index. Otherwise, on statistics taken while no message was pending, Postgres reads
# every pending message through an index of open ones instead of probing the primary key.
_PENDING_BY_ID_SQL = f"(smsmessage.status || '') = '{MessageStatus.PENDING.value}'"

# Assigns every message and starts its attempt in one statement, whatever the batch size,
# and returns the ids it assigned. A message is assigned only while it is still as it was
# read: pending, due, not expired, and with the attempts it had. So the statement is safe
# without a row lock held since the read.
_MARK_ASSIGNED = f"""
    WITH assigned AS (
        UPDATE smsmessage SET
            status = '{MessageStatus.ASSIGNED.value}',
            device_id = moves.device_id,
            -- The sender's number is the number of the phone that the attempt goes to,
            -- or NULL when that device has none.
            from_number = (
                SELECT smsdevice.phone_number FROM smsdevice
                WHERE smsdevice.id = moves.device_id
            ),
            assigned_at = now(),
            attempts = smsmessage.attempts + 1,
            next_attempt_at = NULL,
            -- The error of the previous attempt stays in its smsmessageattempt row.
            error = NULL,
            updated_at = now()
        FROM unnest($1::uuid[], $2::uuid[], $3::integer[])
            AS moves(message_id, device_id, attempts)
        WHERE smsmessage.id = moves.message_id
          AND {_PENDING_BY_ID_SQL}
          AND smsmessage.attempts = moves.attempts
          AND (smsmessage.next_attempt_at IS NULL OR smsmessage.next_attempt_at <= now())
          AND (smsmessage.expires_at IS NULL OR smsmessage.expires_at > now())
        RETURNING smsmessage.id, smsmessage.attempts, moves.device_id
    ), started AS (
        INSERT INTO smsmessageattempt (message_id, attempt_number, device_id, status)
        SELECT id, attempts, device_id, '{AttemptStatus.ASSIGNED.value}' FROM assigned
        ON CONFLICT (message_id, attempt_number) DO NOTHING
    )
    SELECT id FROM assigned
"""

# For each user, its online, active devices with the fewest in-flight messages, ties
# broken by the lower id, up to the user's limit (a NULL limit returns them all). Postgres
# orders uuids byte by byte, which is the order of their text form, the tie-break of
# `plan_assignments`.
#
# The in-flight messages are counted in one pass for all devices. A count per device let
# the planner scan every open message once per device when its statistics showed none
# open, as on a table analyzed while it held only delivered messages.
_LEAST_LOADED_DEVICES = f"""
    WITH loads AS MATERIALIZED (
        SELECT smsmessage.device_id, count(*) AS in_flight
        FROM smsmessage
        WHERE smsmessage.status IN ({_IN_FLIGHT_SQL})
          AND smsmessage.device_id IS NOT NULL
        GROUP BY smsmessage.device_id
    )
    SELECT ranked.id, ranked.user_id, ranked.in_flight
    FROM (
        SELECT smsdevice.id, smsdevice.user_id, limits.device_limit,
            COALESCE(loads.in_flight, 0) AS in_flight,
            row_number() OVER (
                PARTITION BY smsdevice.user_id
                ORDER BY COALESCE(loads.in_flight, 0), smsdevice.id
            ) AS position
        FROM unnest($1::uuid[], $2::integer[]) AS limits(user_id, device_limit)
        JOIN smsdevice ON smsdevice.user_id = limits.user_id
        LEFT JOIN loads ON loads.device_id = smsdevice.id
        WHERE smsdevice.status = '{DeviceStatus.ONLINE.value}'
          AND smsdevice.is_active
    ) AS ranked
    WHERE ranked.device_limit IS NULL OR ranked.position <= ranked.device_limit
"""

# The stream consumer's read of the messages it was signalled, oldest first. The ids come
# as one array joined by primary key, so the statement text is the same for any number
# of ids, and the status test is the one of _PENDING_BY_ID_SQL.
_FIND_PENDING_BY_IDS = f"""
    SELECT smsmessage.id, smsmessage.user_id, smsmessage.requested_device_id,
        smsmessage.to_number, smsmessage.body, smsmessage.segments, smsmessage.encoding,
        smsmessage.created_at, smsmessage.attempts, smsmessage.expires_at
    FROM unnest($1::uuid[]) AS wanted(id)
    JOIN smsmessage ON smsmessage.id = wanted.id
    WHERE {_PENDING_BY_ID_SQL}
      AND smsmessage.type = '{MessageType.OUTGOING.value}'
      AND (smsmessage.next_attempt_at IS NULL OR smsmessage.next_attempt_at <= now())
      AND (smsmessage.expires_at IS NULL OR smsmessage.expires_at > now())
    ORDER BY smsmessage.created_at, smsmessage.id
"""

_REQUESTED_DEVICES = """
    SELECT smsdevice.id, smsdevice.user_id, smsdevice.is_active
    FROM unnest($1::uuid[]) AS wanted(id)
    JOIN smsdevice ON smsdevice.id = wanted.id
"""

# Attempts whose device the next attempt avoids when it can.
_AVOIDED_ATTEMPT_STATUSES = (AttemptStatus.FAILED.value, AttemptStatus.MOVED.value)
_AVOIDED_DEVICES = f"""
    SELECT smsmessageattempt.message_id, smsmessageattempt.device_id
    FROM unnest($1::uuid[]) AS retried(id)
    JOIN smsmessageattempt ON smsmessageattempt.message_id = retried.id
    WHERE smsmessageattempt.status IN ({", ".join(f"'{status}'" for status in _AVOIDED_ATTEMPT_STATUSES)})
      AND smsmessageattempt.device_id IS NOT NULL
"""


def _select_pending(*, by_id: bool = False) -> AnySelect:
    """Build the select of due, unexpired pending messages.

    The status is written into the SQL instead of bound. A partial index on pending
    messages only serves a plan whose status is fixed when it is planned, and Postgres
    may run a prepared statement on a generic plan, planned without its parameters. With `by_id`, for a
    statement that also takes them by id, the status test matches no index (see
    _PENDING_BY_ID_SQL).
    """
    if by_id:
        status_is_pending = SMSMessage.status.concat("") == MessageStatus.PENDING.value
    else:
        status_is_pending = SMSMessage.status == literal_column(
            f"'{MessageStatus.PENDING.value}'"
        )
    return select(
        SMSMessage.id,
        SMSMessage.user_id,
        SMSMessage.requested_device_id,
        SMSMessage.to_number,
        SMSMessage.body,
        SMSMessage.segments,
        SMSMessage.encoding,
        SMSMessage.created_at,
        SMSMessage.attempts,
        SMSMessage.expires_at,
    ).where(
        status_is_pending,
        SMSMessage.type == MessageType.OUTGOING,
        # A retry waits for its delay; an expired message is left to the expiry check.
        or_(
            SMSMessage.next_attempt_at.is_(None),
            SMSMessage.next_attempt_at <= func.now(),
        ),
        _not_expired(),
    )


def _not_expired() -> ColumnElement[bool]:
    return or_(SMSMessage.expires_at.is_(None), SMSMessage.expires_at > func.now())


def _after(statement: AnySelect, cursor: Cursor | None) -> AnySelect:
    if cursor is None:
        return statement
    return statement.where(tuple_(SMSMessage.created_at, SMSMessage.id) > cursor)


def _for_update(statement: AnySelect) -> AnySelect:
    return statement.order_by(SMSMessage.created_at, SMSMessage.id).with_for_update(
        of=SMSMessage, skip_locked=True
    )


async def _fetch_pending(
    session: AsyncSession,
    statement: AnySelect,
    parameters: Mapping[str, Any] | None = None,
) -> list[PendingMessage]:
    """Run a select of pending messages and return them with their avoided devices."""
    rows = (await session.execute(statement, parameters)).all()
    messages = [PendingMessage(**row._mapping) for row in rows]
    return await _with_avoided_devices(await driver_connection(session), messages)


# Built once, because building a statement and its cache key costs more CPU than running
# it. The ids are an IN list with one parameter each, for the reason given above
# _FIND_PENDING_BY_IDS.
_LOCK_PENDING_BY_IDS = (
    _select_pending(by_id=True)
    .where(SMSMessage.id.in_(bindparam("message_ids", expanding=True)))
    .order_by(SMSMessage.created_at, SMSMessage.id)
    .with_for_update(of=SMSMessage, skip_locked=True)
)


async def _with_avoided_devices(
    connection: asyncpg.Connection, messages: list[PendingMessage]
) -> list[PendingMessage]:
    retried = [message.id for message in messages if message.attempts > 0]
    if not retried:
        return messages
    avoided: dict[uuid.UUID, set[uuid.UUID]] = {}
    for message_id, device_id in await connection.fetch(_AVOIDED_DEVICES, retried):
        avoided.setdefault(message_id, set()).add(device_id)
    return [
        replace(message, avoid_device_ids=frozenset(avoided.get(message.id, ())))
        for message in messages
    ]


async def lock_pending_by_ids(
    session: AsyncSession, message_ids: Collection[uuid.UUID]
) -> list[PendingMessage]:
    """Lock those of `message_ids` that are still pending, oldest first."""
    return await _fetch_pending(
        session, _LOCK_PENDING_BY_IDS, {"message_ids": list(message_ids)}
    )


async def find_pending_by_ids(
    connection: asyncpg.Connection, message_ids: Collection[uuid.UUID]
) -> list[PendingMessage]:
    """Return those of `message_ids` that are pending and due, oldest first, without
    locking them."""
    rows = await connection.fetch(
        _FIND_PENDING_BY_IDS, list(dict.fromkeys(message_ids))
    )
    messages = [PendingMessage(*row) for row in rows]
    return await _with_avoided_devices(connection, messages)


async def lock_pending_for_device(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    device_id: uuid.UUID,
    after: Cursor | None,
    limit: int,
) -> list[PendingMessage]:
    """Lock pending messages of the user that may go to `device_id`, oldest first.

    A message that requested another device is not one of them.
    """
    statement = _select_pending().where(
        SMSMessage.user_id == user_id,
        or_(
            SMSMessage.requested_device_id.is_(None),
            SMSMessage.requested_device_id == device_id,
        ),
    )
    return await _fetch_pending(
        session, _for_update(_after(statement, after).limit(limit))
    )


async def lock_assignable_pending(
    session: AsyncSession, *, older_than_s: float, after: Cursor | None, limit: int
) -> list[PendingMessage]:
    """Lock pending messages older than `older_than_s` that an assignment could move.

    Messages that can only wait are left out. These are the ones that requested a disabled
    device, and those without a requested device whose user has no device online. So a
    user with many waiting messages does not cost every sweep a scan of them.
    """
    return await _fetch_pending(
        session, assignable_pending_statement(older_than_s, after, limit)
    )


def assignable_pending_statement(
    older_than_s: float, after: Cursor | None, limit: int
) -> AnySelect:
    """Build the statement of one page of lock_assignable_pending.

    The page walks the index of pending messages (created_at, id) from `after` and stops
    at `limit`, so a sweep that pages through a backlog reads each message once, not the
    whole backlog on every page.
    """
    online_device_of_user = exists().where(
        SMSDevice.user_id == SMSMessage.user_id,
        SMSDevice.status == DeviceStatus.ONLINE,
        SMSDevice.is_active.is_(True),
    )
    requested_device_disabled = exists().where(
        SMSDevice.id == SMSMessage.requested_device_id,
        SMSDevice.is_active.is_(False),
    )
    statement = _select_pending().where(
        SMSMessage.created_at < func.now() - timedelta(seconds=older_than_s),
        or_(
            and_(SMSMessage.requested_device_id.is_(None), online_device_of_user),
            and_(
                SMSMessage.requested_device_id.is_not(None),
                ~requested_device_disabled,
            ),
        ),
    )
    return _for_update(_after(statement, after).limit(limit))


async def lock_due_retries(
    session: AsyncSession, *, after: Cursor | None, limit: int
) -> list[PendingMessage]:
    """Lock pending messages whose retry delay has passed, oldest first."""
    return await _fetch_pending(session, due_retries_statement(after, limit))


def due_retries_statement(after: Cursor | None, limit: int) -> AnySelect:
    """Build the statement of one page of lock_due_retries, which walks the index of
    messages waiting for a retry rather than every pending message."""
    statement = _select_pending().where(SMSMessage.next_attempt_at.is_not(None))
    return _for_update(_after(statement, after).limit(limit))


async def find_least_loaded_devices(
    connection: asyncpg.Connection, device_limits: Mapping[uuid.UUID, int | None]
) -> list[OnlineDevice]:
    """Return the online, active devices of each user in `device_limits` with the fewest
    in-flight messages, ties broken by the lower id, each with its in-flight count.

    A user's limit caps how many of its devices come back, and None returns them all.
    The rows come in no particular order. Postgres ranks every online device of the
    user, but only the devices within the limit reach Python.
    """
    if not device_limits:
        return []
    rows = await connection.fetch(
        _LEAST_LOADED_DEVICES, list(device_limits), list(device_limits.values())
    )
    return [OnlineDevice(*row) for row in rows]


async def find_online_devices(
    connection: asyncpg.Connection, user_ids: Iterable[uuid.UUID]
) -> list[OnlineDevice]:
    """Return the online, active devices of these users, each with its in-flight count."""
    return await find_least_loaded_devices(connection, dict.fromkeys(user_ids))


async def find_requested_devices(
    connection: asyncpg.Connection, device_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, RequestedDevice]:
    rows = await connection.fetch(_REQUESTED_DEVICES, list(set(device_ids)))
    return {row[0]: RequestedDevice(*row) for row in rows}


async def mark_assigned(
    connection: asyncpg.Connection, assignments: Collection[Assignment]
) -> set[uuid.UUID]:
    """Move each message to `assigned` on its device and start its attempt, numbered
    `attempts` + 1; return the ids of the messages assigned.

    A message that is no longer pending, or whose attempts changed since it was read,
    is left as it is and missing from the result.
    """
    if not assignments:
        return set()
    rows = await connection.fetch(
        _MARK_ASSIGNED,
        [item.message.id for item in assignments],
        [item.device_id for item in assignments],
        [item.message.attempts for item in assignments],
    )
    return {row[0] for row in rows}


async def mark_failed(
    session: AsyncSession, message_id: uuid.UUID, error: str
) -> datetime | None:
    """Move a pending message to `failed` and return the time, or None if not pending."""
    statement = (
        update(SMSMessage)
        .where(
            SMSMessage.id == message_id,
            SMSMessage.status.concat("") == MessageStatus.PENDING.value,
        )
        .values(status=MessageStatus.FAILED, failed_at=func.now(), error=error)
        .returning(SMSMessage.failed_at)
    )
    return (await session.execute(statement)).scalar_one_or_none()


# Written into the SQL instead of bound, as in _IN_FLIGHT_SQL, so that the statements
# that look for in-flight messages by device match the predicate of
# ix_smsmessage_device_id_in_flight on a generic plan too. Bound, the generic plan of
# list_devices_with_tasks read every message with a device, the delivered history
# included. Statements that take messages by id keep their statuses bound (see
# _PENDING_BY_ID_SQL).
_IS_IN_FLIGHT = literal_in(SMSMessage.status, IN_FLIGHT_STATUSES)


async def list_devices_with_tasks(
    session: AsyncSession,
    *,
    assigned_before_s: float,
    after: uuid.UUID | None,
    limit: int,
) -> list[uuid.UUID]:
    """Return up to `limit` devices, in id order after `after`, that hold in-flight messages
    assigned more than `assigned_before_s` seconds ago."""
    statement = devices_with_tasks_statement(assigned_before_s, after, limit)
    device_ids = (await session.execute(statement)).scalars()
    return [device_id for device_id in device_ids if device_id is not None]


def devices_with_tasks_statement(
    assigned_before_s: float, after: uuid.UUID | None, limit: int
) -> Select[uuid.UUID | None]:
    """Build the statement of list_devices_with_tasks."""
    statement = (
        select(SMSMessage.device_id)
        .where(
            _IS_IN_FLIGHT,
            SMSMessage.device_id.is_not(None),
            SMSMessage.assigned_at < func.now() - timedelta(seconds=assigned_before_s),
            _not_expired(),
        )
        .group_by(SMSMessage.device_id)
        .order_by(SMSMessage.device_id)
        .limit(limit)
    )
    if after is not None:
        statement = statement.where(SMSMessage.device_id > after)
    return statement


async def list_in_flight_ids(
    session: AsyncSession,
    device_ids: Collection[uuid.UUID],
    *,
    assigned_before_s: float,
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Return (message id, device id) of the in-flight messages of these devices."""
    statement = in_flight_ids_statement(device_ids, assigned_before_s)
    return [(row.id, row.device_id) for row in (await session.execute(statement)).all()]


def in_flight_ids_statement(
    device_ids: Collection[uuid.UUID], assigned_before_s: float
) -> Select[uuid.UUID, uuid.UUID | None]:
    """Build the statement of list_in_flight_ids."""
    return select(SMSMessage.id, SMSMessage.device_id).where(
        SMSMessage.device_id.in_(device_ids),
        _IS_IN_FLIGHT,
        SMSMessage.assigned_at < func.now() - timedelta(seconds=assigned_before_s),
    )


async def load_in_flight_tasks(
    session: AsyncSession, message_ids: Collection[uuid.UUID]
) -> list[InFlightTask]:
    """Load those of `message_ids` still in flight, with the fields of their task frame."""
    statement = (
        select(
            SMSMessage.id,
            SMSMessage.device_id,
            SMSMessage.to_number,
            SMSMessage.body,
            SMSMessage.segments,
            SMSMessage.encoding,
            SMSMessage.created_at,
            SMSMessage.attempts,
            SMSMessage.expires_at,
        )
        .where(
            SMSMessage.id.in_(message_ids),
            SMSMessage.status.in_(IN_FLIGHT_STATUSES),
            _not_expired(),
        )
        .order_by(SMSMessage.assigned_at, SMSMessage.id)
    )
    rows = (await session.execute(statement)).all()
    return [InFlightTask(**row._mapping) for row in rows]
