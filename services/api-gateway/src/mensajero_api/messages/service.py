"""Accepting outgoing messages, and reading a user's messages.

Sending writes the message (`pending`) and charges the monthly quota in one transaction,
commits, and only then signals the dispatcher through Redis. If that signal is lost, the
dispatcher's sweep over Postgres finds the pending message anyway.
"""

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.blank_text import is_blank
from mensajero_api.devices import service as devices_service
from mensajero_api.messages import repository
from mensajero_api.messages.repository import MessageFilters
from mensajero_api.messages.schemas import (
    MAX_TTL_S,
    ExpiryFields,
    MessageListQuery,
    SendRequest,
)
from mensajero_api.pagination import Listing, decode_cursor, split_page
from mensajero_api.phones import InvalidPhoneNumberError, normalize_phone_number
from mensajero_api.quotas import service as quotas_service
from mensajero_common import jsonutil, queues
from mensajero_common.errors import ConflictError, NotFoundError, ValidationFailedError
from mensajero_common.keys import RedisKeys
from mensajero_common.models import (
    MessageStatus,
    MessageType,
    SMSMessage,
    User,
)
from mensajero_common.segments import count_segments
from mensajero_common.settings import Settings

logger = structlog.get_logger(__name__)

# Postgres SQLSTATE of foreign_key_violation.
FOREIGN_KEY_VIOLATION = "23503"

# Marks the request kind in the stored request hash, so that one key reused for another
# endpoint (a bulk send, say) counts as a different request.
_SEND_OPERATION = "sms.send"


class MessageNotFoundError(NotFoundError):
    """The message does not exist or belongs to another user."""

    code = "message_not_found"

    def __init__(self, message_id: uuid.UUID) -> None:
        super().__init__(
            message_id=str(message_id), details={"message_id": str(message_id)}
        )


class EmptyBodyError(ValidationFailedError):
    code = "empty_body"


class BodyTooLongError(ValidationFailedError):
    code = "body_too_long"

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(
            length=length, limit=limit, details={"length": length, "limit": limit}
        )


class IdempotencyKeyReusedError(ConflictError):
    code = "idempotency_key_reused"


class InvalidDateRangeError(ValidationFailedError):
    code = "invalid_date_range"

    def __init__(self, date_from: datetime | date, date_to: datetime | date) -> None:
        super().__init__(
            date_from=date_from.isoformat(),
            date_to=date_to.isoformat(),
            details={
                "date_from": date_from.isoformat(),
                "date_to": date_to.isoformat(),
            },
        )


@dataclass(frozen=True)
class SendOutcome:
    message: SMSMessage
    # False when an earlier request with the same Idempotency-Key created the message.
    created: bool


class InvalidExpiryError(ValidationFailedError):
    """`reason`: ttl_and_expires_at, in_the_past or too_far; each has its own message."""

    code = "invalid_expiry"

    def __init__(self, reason: str, **params: Any) -> None:
        super().__init__(
            message_key=f"invalid_expiry_{reason}",
            details={"reason": reason, **params},
            **params,
        )


def resolve_expiry(data: ExpiryFields, now: datetime | None = None) -> datetime | None:
    """Return when the message expires, from `ttl` or `expires_at`, or None.

    Raises InvalidExpiryError when both are given or the time has already passed.
    """
    if data.ttl is not None and data.expires_at is not None:
        raise InvalidExpiryError("ttl_and_expires_at")
    now = now or datetime.now(UTC)
    if data.ttl is not None:
        return now + timedelta(seconds=data.ttl)
    if data.expires_at is None:
        return None
    expires_at = data.expires_at
    if expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    if expires_at <= now:
        raise InvalidExpiryError("in_the_past")
    if expires_at - now > timedelta(seconds=MAX_TTL_S):
        raise InvalidExpiryError("too_far", max_days=MAX_TTL_S // 86400)
    return expires_at


def expiry_for_hash(data: ExpiryFields) -> dict[str, Any]:
    """Return the expiry as the request gave it, for the idempotency hash."""
    return {
        "ttl": data.ttl,
        "expires_at": data.expires_at.isoformat() if data.expires_at else None,
    }


def _request_hash(data: SendRequest) -> str:
    canonical = {
        "operation": _SEND_OPERATION,
        "to": data.to.strip(),
        "body": data.body,
        "device_id": str(data.device_id) if data.device_id else None,
        **expiry_for_hash(data),
    }
    return hashlib.sha256(jsonutil.dumps(canonical)).hexdigest()


def check_body(body: str, settings: Settings) -> None:
    """Raise EmptyBodyError or BodyTooLongError unless `body` can be sent.

    A body of only whitespace and invisible characters (U+200B, U+FEFF, …) counts as
    empty, because the phone would show nothing.
    """
    if is_blank(body):
        raise EmptyBodyError()
    # Characters (code points), the unit users count in; segments are counted separately.
    if len(body) > settings.SMS_MAX_BODY_LENGTH:
        raise BodyTooLongError(len(body), settings.SMS_MAX_BODY_LENGTH)


async def check_sending_device(
    session: AsyncSession, user: User, device_id: uuid.UUID | None
) -> None:
    """Raise unless `device_id` is None or an active device of the user.

    The device's row stays locked (FOR KEY SHARE, as the message's foreign key check
    would lock it) until the transaction ends. So a concurrent delete of the device
    waits for the message instead of removing the row that its insert references. The
    send takes this lock before the quota row's, as the delete takes its locks of the
    two rows, so a send and a delete cannot deadlock on them.
    """
    if device_id is None:
        return
    device = await devices_service.get_device(
        session, user, device_id, lock="key_share"
    )
    if not device.is_active:
        raise devices_service.DeviceInactiveError(device.id)


def outgoing_values(
    user: User,
    to_number: str,
    body: str,
    device_id: uuid.UUID | None,
    expires_at: datetime | None = None,
) -> dict[str, Any]:
    """Return the column values of a new outgoing message, `pending`, with a fresh id."""
    segment_info = count_segments(body)
    return {
        "id": uuid.uuid4(),
        "user_id": user.id,
        "type": MessageType.OUTGOING,
        "status": MessageStatus.PENDING,
        "to_number": to_number,
        "body": body,
        "segments": segment_info.segments,
        "encoding": segment_info.encoding,
        "device_id": device_id,
        "requested_device_id": device_id,
        "expires_at": expires_at,
    }


def _replay(existing: SMSMessage, request_hash: str) -> SendOutcome:
    if existing.meta.get("request_hash") != request_hash:
        raise IdempotencyKeyReusedError()
    return SendOutcome(message=existing, created=False)


async def send_message(
    session: AsyncSession,
    redis: Redis,
    keys: RedisKeys,
    settings: Settings,
    user: User,
    data: SendRequest,
    idempotency_key: str | None,
) -> SendOutcome:
    """Validate, store and charge one outgoing message, commit, then signal the dispatcher.

    With an `idempotency_key`, a repeat of the same request returns the first message
    (no second message, no second charge), and the same key with another request raises
    IdempotencyKeyReusedError.
    """
    request_hash = _request_hash(data)
    # Looked up before validating, so a repeat returns the first result even if, say,
    # the device has been disabled since.
    if idempotency_key is not None:
        existing = await repository.get_message_by_idempotency_key(
            session, user.id, idempotency_key
        )
        if existing is not None:
            return _replay(existing, request_hash)

    to_number = normalize_phone_number(data.to, user.default_region)
    check_body(data.body, settings)
    expires_at = resolve_expiry(data)
    await check_sending_device(session, user, data.device_id)

    values = {
        **outgoing_values(user, to_number, data.body, data.device_id, expires_at),
        "idempotency_key": idempotency_key,
        "meta": {"request_hash": request_hash} if idempotency_key else {},
    }
    period = quotas_service.QuotaPeriod.at(datetime.now(UTC), settings)
    created_at = await repository.insert_charged(
        session, values, period.start, period.today
    )
    if created_at is not None:
        message = SMSMessage(**values, created_at=created_at)
    else:
        # The quota is used up, or a concurrent request took the idempotency key after
        # this statement charged the quota. Roll back, then take the slower path below,
        # which distinguishes the two cases and builds the response. The rollback
        # expires `user`, so only `values` is read from here on.
        await session.rollback()
        inserted = await _insert_then_charge(session, settings, values)
        if isinstance(inserted, SendOutcome):
            return inserted
        message = inserted
    await session.commit()
    # Signalled before the log line is written, so the dispatcher does not wait for it.
    await _signal_dispatcher(redis, keys, message)

    logger.info(
        "message accepted",
        user_id=str(values["user_id"]),
        message_id=str(message.id),
        device_id=str(data.device_id) if data.device_id else None,
        segments=message.segments,
        **({"body": message.body} if settings.LOG_MESSAGE_BODIES else {}),
    )
    return SendOutcome(message=message, created=True)


async def _insert_then_charge(
    session: AsyncSession, settings: Settings, values: dict[str, Any]
) -> SMSMessage | SendOutcome:
    """Insert the message, then charge it; return the replay if the key is taken.

    Raises QuotaExceededError with the quota's figures when no SMS is left.
    """
    idempotency_key = values["idempotency_key"]
    # The insert comes before the quota charge: a concurrent request with the same key
    # waits on it and then replays this message, instead of being refused by a quota
    # that this message has just used up.
    try:
        message = await repository.insert_outgoing(session, values)
    except IntegrityError as error:
        # The rollback before this call released the lock of check_sending_device, and
        # the device has been deleted since.
        if (
            values["device_id"] is None
            or getattr(error.orig, "sqlstate", None) != FOREIGN_KEY_VIOLATION
        ):
            raise
        raise devices_service.DeviceNotFoundError(values["device_id"]) from None
    if message is None:
        assert idempotency_key is not None
        existing = await repository.get_message_by_idempotency_key(
            session, values["user_id"], idempotency_key
        )
        if existing is None:
            raise RuntimeError(
                "insert conflicted on the idempotency key, but no message has that key"
            )
        return _replay(existing, values["meta"]["request_hash"])

    await quotas_service.charge_sms(session, values["user_id"], 1, settings)
    return message


async def _signal_dispatcher(
    redis: Redis, keys: RedisKeys, message: SMSMessage
) -> None:
    # The entry carries the message, which saves the dispatcher a read of it.
    signalled = queues.NewMessage(
        id=message.id,
        user_id=message.user_id,
        requested_device_id=message.requested_device_id,
        to_number=message.to_number or "",
        body=message.body,
        segments=message.segments,
        encoding=message.encoding,
        created_at=message.created_at,
        expires_at=message.expires_at,
    )
    try:
        await queues.signal_new_message(redis, keys, signalled)
    except RedisError:
        # The message is committed; the dispatcher's sweep of pending rows sends it later.
        logger.exception("signalling the dispatcher failed", message_id=str(message.id))


async def get_message(
    session: AsyncSession, user: User, message_id: uuid.UUID
) -> SMSMessage:
    message = await repository.get_message(session, user.id, message_id)
    if message is None:
        raise MessageNotFoundError(message_id)
    return message


# The instants a datetime can hold in UTC. An offset can put a valid input outside them
# (9999-12-31T23:59:59-14:00 is in the year 10000 in UTC), and converting such a value
# to UTC, as asyncpg does for a timestamptz parameter, raises OverflowError.
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


def _as_moment(value: datetime | date) -> datetime:
    """Return `value` as an aware datetime: a naive one is UTC, a date its midnight UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.combine(value, time.min, tzinfo=UTC)


def _date_to_span(value: datetime | date) -> timedelta:
    # Postgres keeps microseconds, so a datetime includes itself and nothing later, and
    # a bare date includes that whole day.
    if isinstance(value, datetime):
        return timedelta(microseconds=1)
    return timedelta(days=1)


def _lower_bound(value: datetime | date) -> datetime | None:
    """Return the UTC instant of `date_from`, or None when it precedes every row.

    A bound after the last instant a datetime can hold returns that instant, so the
    listing is empty, as it is for any bound later than every row.
    """
    moment = _as_moment(value)
    if moment <= _EARLIEST:
        return None
    if moment >= _LATEST:
        return _LATEST
    return moment.astimezone(UTC)


def _exclusive_upper_bound(value: datetime | date) -> datetime | None:
    """Return the UTC instant just after `date_to`, or None when no row is later.

    date_to=9999-12-31 is a common way to write "no upper bound", and its end does not
    fit in a datetime, so it leaves the listing unbounded instead of failing.
    """
    moment = _as_moment(value)
    span = _date_to_span(value)
    if moment > _LATEST - span:
        return None
    # Before the first instant a datetime can hold, so no row matches.
    if moment < _EARLIEST:
        return _EARLIEST
    # Added in UTC: a wall time near the extremes may overflow with its offset.
    return moment.astimezone(UTC) + span


def _is_empty_range(date_from: datetime | date, date_to: datetime | date) -> bool:
    # Compared as a timedelta, which does not overflow where the bounds in UTC would.
    return _as_moment(date_from) - _as_moment(date_to) >= _date_to_span(date_to)


def _build_filters(
    user: User, query: MessageListQuery, message_type: MessageType | None
) -> MessageFilters:
    if (
        query.date_from is not None
        and query.date_to is not None
        and _is_empty_range(query.date_from, query.date_to)
    ):
        raise InvalidDateRangeError(query.date_from, query.date_to)
    created_from = _lower_bound(query.date_from) if query.date_from else None
    created_before = _exclusive_upper_bound(query.date_to) if query.date_to else None

    phone = None
    if query.phone is not None:
        phone = _read_phone_filter(query.phone, user.default_region)
    return MessageFilters(
        statuses=tuple(query.status or ()),
        type=message_type or query.type,
        device_id=query.device_id,
        phone=phone,
        created_from=created_from,
        created_before=created_before,
    )


def _read_phone_filter(number: str, default_region: str | None) -> str:
    """Return the `phone` filter in E.164, or raise InvalidPhoneNumberError.

    A "+" written unencoded in a query string reaches the API as a space, so
    `phone=+34612345678` arrives as " 34612345678". A number that starts with a space
    and is invalid as written is read again with the "+". A number valid as written is
    kept as it is, so no filter that worked before changes meaning.
    """
    try:
        return normalize_phone_number(number, default_region)
    except InvalidPhoneNumberError as error:
        if not number.startswith(" ") or number.startswith("  "):
            raise
        as_written = error
    try:
        return normalize_phone_number("+" + number[1:], default_region)
    except InvalidPhoneNumberError:
        raise as_written from None


async def list_messages(
    session: AsyncSession,
    user: User,
    query: MessageListQuery,
    message_type: MessageType | None = None,
) -> tuple[list[SMSMessage], str | None]:
    """Return one page of the user's messages and the cursor of the next page, if any.

    `message_type` overrides the query's `type` (the incoming listing fixes it). A
    `device_id` that is not one of the user's devices raises DeviceNotFoundError, as a
    send from it does, so that a mistyped id is not read as "no messages".
    """
    filters = _build_filters(user, query, message_type)
    if query.device_id is not None:
        await devices_service.get_device(session, user, query.device_id)
    listing = (
        Listing.INCOMING if message_type == MessageType.INCOMING else Listing.MESSAGES
    )
    after = decode_cursor(query.cursor, query.order, listing) if query.cursor else None

    rows = await repository.list_messages(
        session,
        user.id,
        filters,
        after=after,
        descending=query.order == "desc",
        limit=query.limit + 1,
    )
    return split_page(rows, query.limit, query.order, listing)
