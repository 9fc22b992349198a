"""SQL of the device-hub. Every function runs inside the caller's session and never commits."""

import functools
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import (
    DateTime,
    Table,
    Update,
    and_,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.selectable import ScalarSelect

from mensajero_common.db import driver_connection
from mensajero_common.models import (
    MessageStatus,
    MessageType,
    SMSDevice,
    SMSMessage,
)
from mensajero_common.segments import count_segments
from mensajero_common.status import TIMESTAMP_COLUMNS, predecessors
from mensajero_hub.core.frames import ConnectionReplacedError

_messages = cast(Table, SMSMessage.__table__)
_devices = cast(Table, SMSDevice.__table__)

# Statuses in which a task is still the phone's to send; any other status makes its stream
# entry stale.
PUSHABLE_STATUSES = (MessageStatus.ASSIGNED.value, MessageStatus.SENDING.value)


@dataclass(frozen=True)
class DeviceCredentials:
    device_id: uuid.UUID
    user_id: uuid.UUID
    name: str
    phone_number: str | None
    device_is_active: bool
    user_is_active: bool
    api_key_expires_at: datetime | None
    default_region: str | None


@dataclass(frozen=True)
class MessageChange:
    """A message row as it is after a status change, with what its webhook event needs."""

    status: MessageStatus
    user_id: uuid.UUID
    from_number: str | None
    to_number: str | None
    body: str
    segments: int
    error: str | None
    changed_at: datetime


# Sent on asyncpg directly, outside a transaction: every connection starts with it, and
# through the session it would cost BEGIN and ROLLBACK round trips around the SELECT.
_FIND_DEVICE_BY_KEY_HASH_SQL = """
SELECT d.id, d.user_id, d.name, d.phone_number, d.is_active, u.is_active,
    d.api_key_expires_at, u.default_region
FROM smsdevice AS d JOIN "user" AS u ON u.id = d.user_id
WHERE d.api_key_hash = $1
"""

# Absent values keep the stored ones; `updated_at` moves as the model's onupdate would.
_UPDATE_REGISTRATION_SQL = """
UPDATE smsdevice SET
    name = COALESCE($2, name),
    phone_number = COALESCE($3, phone_number),
    app_version = COALESCE($4, app_version),
    protocol_version = $5,
    updated_at = now()
WHERE id = $1
RETURNING name, phone_number
"""


async def find_device_by_key_hash(
    db: AsyncSession, api_key_hash: str
) -> DeviceCredentials | None:
    """Return the device with this key hash and what authentication checks of its owner.

    The SELECT runs outside a transaction, so `db` must not have begun one.
    """
    connection = await driver_connection(db, transaction=False)
    row = await connection.fetchrow(_FIND_DEVICE_BY_KEY_HASH_SQL, api_key_hash)
    if row is None:
        return None
    return DeviceCredentials(*row)


async def update_registration(
    db: AsyncSession,
    device_id: uuid.UUID,
    *,
    name: str | None,
    phone_number: str | None,
    app_version: str | None,
    protocol_version: int,
    still_current: Callable[[], Awaitable[bool]],
) -> tuple[str, str | None] | None:
    """Store what a phone registered; absent values keep the stored ones.

    Returns the device's name and number as stored, or None when the device is gone.
    `still_current` is awaited while the UPDATE holds the device's row lock. When it
    returns False, the UPDATE is rolled back and ConnectionReplacedError is raised.
    `db` must not have begun a transaction, because this one runs on asyncpg: BEGIN
    and COMMIT, without the extra statement that begins a session's transaction.
    """
    connection = await driver_connection(db, transaction=False)
    async with connection.transaction():
        row = await connection.fetchrow(
            _UPDATE_REGISTRATION_SQL,
            device_id,
            name,
            phone_number,
            app_version,
            protocol_version,
        )
        if row is None:
            return None
        if not await still_current():
            raise ConnectionReplacedError()
    return row[0], row[1]


# One statement text for any number of devices, because an IN list would make a new
# prepared statement per batch size. `updated_at` moves as the model's onupdate would.
# It also returns whether the device and its owner are active, because disabling an
# account, or a device directly in Postgres, publishes nothing that the hub could act on.
_WRITE_HEARTBEATS_SQL = """
    UPDATE smsdevice AS d
    SET status = 'online', last_heartbeat = clock_timestamp(), updated_at = now()
    FROM "user" AS u
    WHERE d.id = ANY($1::uuid[]) AND u.id = d.user_id
    RETURNING d.id, d.last_heartbeat, d.is_active, u.is_active
"""


@dataclass(frozen=True, slots=True)
class WrittenHeartbeat:
    heartbeat_at: datetime
    # "device_inactive" or "user_inactive" when the device or its owner is disabled.
    disabled_reason: str | None


def disabled_reason(device_is_active: bool, user_is_active: bool) -> str | None:
    """Return the `invalid_api_key` reason that a disabled device or owner gets, or None."""
    if not device_is_active:
        return "device_inactive"
    if not user_is_active:
        return "user_inactive"
    return None


async def write_heartbeats(
    db: AsyncSession, device_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, WrittenHeartbeat]:
    """Mark these devices online with a fresh heartbeat; return the heartbeat of each
    device that still exists, and whether it or its owner is disabled.

    clock_timestamp() gives every row its own value even within one statement, so a
    heartbeat identifies the write that made it (see mark_offline). The UPDATE runs on
    asyncpg and commits on its own, because through the ORM its BEGIN, COMMIT and
    result handling cost more CPU than the statement. So `db` must not have begun a
    transaction.
    """
    connection = await driver_connection(db, transaction=False)
    rows = await connection.fetch(_WRITE_HEARTBEATS_SQL, list(device_ids))
    return {
        row[0]: WrittenHeartbeat(row[1], disabled_reason(row[2], row[3]))
        for row in rows
        if row[1] is not None
    }


_MARK_OFFLINE = text(
    """
    UPDATE smsdevice SET status = 'offline', updated_at = now()
    FROM unnest(:device_ids, :heartbeats) AS closing(device_id, heartbeat_at)
    WHERE smsdevice.id = closing.device_id
      AND smsdevice.last_heartbeat = closing.heartbeat_at
      AND smsdevice.status = 'online'
    RETURNING smsdevice.id, closing.heartbeat_at
    """
).bindparams(
    bindparam("device_ids", type_=ARRAY(UUID(as_uuid=True))),
    bindparam("heartbeats", type_=ARRAY(DateTime(timezone=True))),
)


async def mark_offline(
    db: AsyncSession, closing: Collection[tuple[uuid.UUID, datetime]]
) -> set[tuple[uuid.UUID, datetime]]:
    """Mark devices offline unless another connection wrote their heartbeat since.

    Each pair is a device and the last heartbeat its closing connection wrote. A newer
    connection of the device (on any hub) writes a different one, and then the device stays
    online. Returns the pairs whose device went offline.
    """
    device_ids = [device_id for device_id, _ in closing]
    heartbeats = [heartbeat_at for _, heartbeat_at in closing]
    result = await db.execute(
        _MARK_OFFLINE, {"device_ids": device_ids, "heartbeats": heartbeats}
    )
    return {(row[0], row[1]) for row in result.all()}


def _device_number_subquery() -> ScalarSelect[str | None]:
    """Select the number of the reporting device, whose id is the bound `b_device_id`."""
    return (
        select(_devices.c.phone_number)
        .where(_devices.c.id == bindparam("b_device_id"))
        .scalar_subquery()
    )


@functools.cache
def _advance_statement(status: MessageStatus) -> Update:
    """Build the UPDATE of `advance_message_status` for one target status, once.

    A Core statement on the table with bound parameters: the ORM's bulk UPDATE would
    build, compile and synchronize the session for every report.
    """
    timestamp_column = _messages.c[TIMESTAMP_COLUMNS[status]]
    # A move to `failed` stores the attempt's error. Any other move clears the error of
    # an earlier failed attempt, which keeps it in its own smsmessageattempt row.
    # `from_number` gets the device's number when it has none, as in advance_messages.
    values: dict[str, object] = {
        "status": status.value,
        timestamp_column.name: func.now(),
        "error": bindparam("b_error") if status is MessageStatus.FAILED else None,
        "from_number": func.coalesce(
            _messages.c.from_number, _device_number_subquery()
        ),
    }
    if status is MessageStatus.DELIVERED:
        # A delivered SMS went out, also when its phone never reported `sent`.
        values["sent_at"] = func.coalesce(_messages.c.sent_at, func.now())
    return (
        update(_messages)
        .where(
            _messages.c.id == bindparam("b_message_id"),
            _messages.c.device_id == bindparam("b_device_id"),
            _messages.c.type == MessageType.OUTGOING.value,
            # Never from `pending`: a report cannot start an attempt, and a late report
            # of a failed attempt must not move its retry.
            _messages.c.status.in_(
                [
                    state.value
                    for state in predecessors(status)
                    if state is not MessageStatus.PENDING
                ]
            ),
        )
        .values(**values)
        .returning(
            _messages.c.status,
            _messages.c.user_id,
            _messages.c.from_number,
            _messages.c.to_number,
            _messages.c.body,
            _messages.c.segments,
            _messages.c.error,
            timestamp_column,
        )
    )


async def advance_message_status(
    db: AsyncSession,
    device_id: uuid.UUID,
    message_id: uuid.UUID,
    status: MessageStatus,
    error: str | None,
) -> MessageChange | None:
    """Move an outgoing message of this device forward to `status`.

    Returns the changed row, or None when the message is not this device's or the move
    would go backwards (a late or repeated report), in which case nothing changes.
    """
    parameters: dict[str, object] = {
        "b_message_id": message_id,
        "b_device_id": device_id,
    }
    if status is MessageStatus.FAILED:
        parameters["b_error"] = error
    result = await db.execute(_advance_statement(status), parameters)
    row = result.one_or_none()
    if row is None:
        return None
    return MessageChange(MessageStatus(row[0]), *row[1:])


# Statuses that advance_messages moves a message to, each with its timestamp column.
FORWARD_STATUSES = (MessageStatus.SENDING, MessageStatus.SENT, MessageStatus.DELIVERED)


def _forward_timestamp(status: MessageStatus) -> str:
    """Build the SET clause of a forward status's timestamp column in _ADVANCE_MESSAGES.

    A move to `delivered` also fills `sent_at` when the phone never reported `sent`.
    """
    column = TIMESTAMP_COLUMNS[status]
    cases = [f"WHEN moves.to_status = '{status.value}' THEN now()"]
    if status is MessageStatus.SENT:
        cases.append(
            f"WHEN moves.to_status = '{MessageStatus.DELIVERED.value}' "
            "THEN COALESCE(smsmessage.sent_at, now())"
        )
    return f"{column} = CASE {' '.join(cases)} ELSE smsmessage.{column} END"


_FORWARD_TIMESTAMPS = ",\n".join(_forward_timestamp(s) for s in FORWARD_STATUSES)
# Sent on the session's asyncpg connection, inside its transaction: through SQLAlchemy,
# binding the arrays and building the result cost more CPU than the statement.
_ADVANCE_MESSAGES = f"""
    UPDATE smsmessage SET
        status = moves.to_status,
        {_FORWARD_TIMESTAMPS},
        -- The error of an earlier failed attempt stays in that attempt's row only.
        error = NULL,
        -- The dispatcher stores the device's number at assignment. This fills it in
        -- when the device registered its number only after that; COALESCE evaluates
        -- the subquery only for rows that have no number.
        from_number = COALESCE(
            smsmessage.from_number,
            (SELECT phone_number FROM smsdevice WHERE smsdevice.id = moves.device_id)
        ),
        updated_at = now()
    FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[])
        AS moves(message_id, device_id, from_status, to_status)
    WHERE smsmessage.id = moves.message_id
      AND smsmessage.device_id = moves.device_id
      AND smsmessage.type = '{MessageType.OUTGOING.value}'
      AND smsmessage.status = moves.from_status
    RETURNING smsmessage.id, smsmessage.status, smsmessage.user_id,
        smsmessage.from_number, smsmessage.to_number, smsmessage.body,
        smsmessage.segments, smsmessage.error, now()
"""


@dataclass(frozen=True)
class ForwardMove:
    """A move of an outgoing message of a device from the status it has, as locked by
    the caller, to a later status of FORWARD_STATUSES."""

    message_id: uuid.UUID
    device_id: uuid.UUID
    from_status: MessageStatus
    to_status: MessageStatus


async def advance_messages(
    db: AsyncSession, moves: Collection[ForwardMove]
) -> dict[uuid.UUID, MessageChange]:
    """Apply these moves, like advance_message_status, in one statement.

    A move applies only while the message is still this device's, outgoing and in its
    `from_status`. Returns the change of each message that moved. `changed_at` is the
    transaction's time, which is what the timestamp column gets.
    """
    if not moves:
        return {}
    for move in moves:
        if move.to_status not in FORWARD_STATUSES:
            raise ValueError(
                f"advance_messages cannot move a message to {move.to_status}"
            )
    connection = await driver_connection(db)
    rows = await connection.fetch(
        _ADVANCE_MESSAGES,
        [move.message_id for move in moves],
        [move.device_id for move in moves],
        [move.from_status.value for move in moves],
        [move.to_status.value for move in moves],
    )
    return {row[0]: MessageChange(MessageStatus(row[1]), *row[2:]) for row in rows}


_WEBHOOK_SUBSCRIPTIONS = """
    SELECT DISTINCT user_id, unnest(events) FROM webhookconfig
    WHERE user_id = ANY($1::uuid[]) AND is_active
"""


async def find_webhook_subscriptions(
    db: AsyncSession, user_ids: Collection[uuid.UUID]
) -> set[tuple[uuid.UUID, str]]:
    """Return the (user id, event) pairs that an active webhook of these users wants."""
    if not user_ids:
        return set()
    connection = await driver_connection(db)
    rows = await connection.fetch(_WEBHOOK_SUBSCRIPTIONS, list(user_ids))
    return {(row[0], row[1]) for row in rows}


_LOCK_DEVICE_OWNER_SQL = text(
    """
    SELECT d.is_active, u.is_active
    FROM smsdevice AS d JOIN "user" AS u ON u.id = d.user_id
    WHERE d.id = :device_id
    FOR SHARE OF u
    """
)


async def lock_device_owner(db: AsyncSession, device_id: uuid.UUID) -> str | None:
    """Lock the device's owner against changes until the transaction ends, and return
    why the device may not store anything ("device_inactive", "user_inactive" or
    "deleted"), or None when it may.

    The share lock makes a concurrent UPDATE of the owner's row wait for this
    transaction, and this statement wait for that UPDATE and read its result. So once an
    UPDATE that disables the account commits, no incoming SMS of its devices is stored.
    The device's own `is_active` is read without a lock.
    """
    row = (await db.execute(_LOCK_DEVICE_OWNER_SQL, {"device_id": device_id})).first()
    if row is None:
        return "deleted"
    return disabled_reason(row[0], row[1])


async def insert_incoming(
    db: AsyncSession,
    *,
    device_id: uuid.UUID,
    user_id: uuid.UUID,
    from_number: str,
    to_number: str | None,
    body: str,
    received_at: datetime,
    sms_id: str | None,
) -> uuid.UUID | None:
    """Insert an incoming SMS; return its id, or None when this `sms_id` is stored already."""
    segment_info = count_segments(body)
    values = {
        "id": uuid.uuid4(),
        "device_id": device_id,
        "user_id": user_id,
        "type": MessageType.INCOMING.value,
        "status": MessageStatus.RECEIVED.value,
        "from_number": from_number,
        "to_number": to_number,
        "body": body,
        "segments": segment_info.segments,
        "encoding": segment_info.encoding,
        "received_at": received_at,
        "external_id": sms_id,
    }
    if sms_id is None:
        statement = insert(SMSMessage).values(**values).returning(SMSMessage.id)
        return (await db.execute(statement)).scalar_one()

    deduplicated = (
        pg_insert(SMSMessage)
        .values(**values)
        .on_conflict_do_nothing(
            index_elements=[SMSMessage.device_id, SMSMessage.external_id],
            index_where=SMSMessage.external_id.is_not(None),
        )
        .returning(SMSMessage.id)
    )
    return (await db.execute(deduplicated)).scalar_one_or_none()


async def find_incoming_id(
    db: AsyncSession, device_id: uuid.UUID, sms_id: str
) -> uuid.UUID | None:
    statement = select(SMSMessage.id).where(
        and_(SMSMessage.device_id == device_id, SMSMessage.external_id == sms_id)
    )
    return (await db.execute(statement)).scalar_one_or_none()


async def find_pushable_message_ids(
    db: AsyncSession, device_id: uuid.UUID, message_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """Return which of these messages are still assigned to this device, unsent and not
    expired, each with its current attempt."""
    statement = select(SMSMessage.id, SMSMessage.attempts).where(
        SMSMessage.id.in_(list(message_ids)),
        SMSMessage.device_id == device_id,
        SMSMessage.type == MessageType.OUTGOING.value,
        SMSMessage.status.in_(PUSHABLE_STATUSES),
        SMSMessage.expires_at.is_(None) | (SMSMessage.expires_at > func.now()),
    )
    rows = (await db.execute(statement)).all()
    # Rows assigned before attempts were counted have 0; their attempt is the first.
    return {row.id: max(row.attempts, 1) for row in rows}
