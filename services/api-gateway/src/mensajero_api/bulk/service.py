"""Bulk sending: many outgoing messages from one request, and their progress.

One request is validated recipient by recipient: invalid and repeated recipients are
rejected one by one and not charged, and the rest go out. The quota for all of them is
charged in conditional UPDATEs (all or nothing), the messages are inserted a chunk at a
time while the next chunk is validated, and the transaction commits before the
dispatcher is signalled, by one Redis script call after the response has gone out.

Cancelling a task cancels each of its messages that no phone has claimed, with the rules
of a single message's cancel, a batch per transaction.
"""

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.bulk import repository
from mensajero_api.bulk.schemas import BulkSendRequest
from mensajero_api.messages import cancellation
from mensajero_api.messages import service as messages_service
from mensajero_api.quotas import service as quotas_service
from mensajero_common import jsonutil, message_attempts, queues
from mensajero_common.errors import NotFoundError, ValidationFailedError
from mensajero_common.i18n import translate
from mensajero_common.keys import RedisKeys
from mensajero_common.models import MessageStatus, SMSBulkTask, User
from mensajero_common.phone import PhoneNumberError, normalize_e164
from mensajero_common.settings import Settings

logger = structlog.get_logger(__name__)

# Marks the request kind in the stored request hash, as the single send does.
_BULK_OPERATION = "sms.send_bulk"

# Statuses whose messages still wait for a device or for its report.
IN_FLIGHT_STATUSES = frozenset(
    {MessageStatus.PENDING, MessageStatus.ASSIGNED, MessageStatus.SENDING}
)
OUTGOING_STATUSES = (
    MessageStatus.PENDING,
    MessageStatus.ASSIGNED,
    MessageStatus.SENDING,
    MessageStatus.SENT,
    MessageStatus.DELIVERED,
    MessageStatus.FAILED,
    MessageStatus.EXPIRED,
)

REASON_DUPLICATE = "duplicate"

# Recipients validated, and their messages inserted, per chunk: Postgres inserts one
# chunk while the next is validated.
INSERT_CHUNK = 250
# Messages cancelled per transaction, as many as in a dispatcher batch. A phone's claim
# of a locked message, and with it the hub's whole report batch, waits until the
# transaction ends. Each message costs several statements, an estimated 6 to 10 ms from
# one run of 1000 messages on a busy development machine.
CANCEL_BATCH_SIZE = 100


class TooManyRecipientsError(ValidationFailedError):
    code = "too_many_recipients"

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(
            count=count, limit=limit, details={"count": count, "limit": limit}
        )


class NoValidRecipientsError(ValidationFailedError):
    """Every recipient was rejected; the body lists why, in the request's language."""

    code = "no_valid_recipients"

    def __init__(self, rejected: list[dict[str, Any]]) -> None:
        super().__init__()
        self.rejected = rejected

    def to_body(self, language: str) -> dict[str, Any]:
        return {
            **super().to_body(language),
            "rejected": [describe_rejection(item, language) for item in self.rejected],
        }


class BulkTaskNotFoundError(NotFoundError):
    """The task does not exist or belongs to another user."""

    code = "bulk_task_not_found"

    def __init__(self, task_id: uuid.UUID) -> None:
        super().__init__(task_id=str(task_id), details={"task_id": str(task_id)})


@dataclass
class BulkPlan:
    """The outcome of validating every recipient, before anything is written."""

    # (to_number in E.164, body) of each message to create, in request order.
    accepted: list[tuple[str, str]] = field(default_factory=list)
    # Stored in the task as JSON: index, number, reason and the fields of its message.
    rejected: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class BulkOutcome:
    task: SMSBulkTask
    # False when an earlier request with the same Idempotency-Key created the task.
    created: bool


@dataclass(frozen=True)
class BulkProgressCounts:
    task: SMSBulkTask
    counts: dict[MessageStatus, int]

    @property
    def in_flight(self) -> bool:
        return any(self.counts[status] for status in IN_FLIGHT_STATUSES)


@dataclass(frozen=True)
class BulkCancelOutcome:
    progress: BulkProgressCounts
    # Messages that this request cancelled.
    cancelled: int


def describe_rejection(item: dict[str, Any], language: str) -> dict[str, Any]:
    """Render a stored rejection for a response: its fields and a localized message."""
    reason = item["reason"]
    if reason == REASON_DUPLICATE:
        message = translate(
            "duplicate_recipient", language, first_index=item["duplicate_of"]
        )
    elif reason == messages_service.EmptyBodyError.code:
        message = translate(reason, language)
    elif reason == messages_service.BodyTooLongError.code:
        message = translate(
            reason, language, length=item["length"], limit=item["limit"]
        )
    else:
        message = translate(
            "invalid_phone_number", language, number=item["number"], reason=reason
        )
    return {
        "index": item["index"],
        "number": item["number"],
        "reason": reason,
        "message": message,
        "duplicate_of": item.get("duplicate_of"),
    }


def _request_hash(data: BulkSendRequest) -> str:
    canonical = {
        "operation": _BULK_OPERATION,
        "recipients": [recipient.strip() for recipient in data.recipients or []],
        "body": data.body,
        "messages": [[m.to.strip(), m.body] for m in data.messages or []],
        "device_id": str(data.device_id) if data.device_id else None,
        **messages_service.expiry_for_hash(data),
    }
    return hashlib.sha256(jsonutil.dumps(canonical)).hexdigest()


def _body_rejection(body: str, settings: Settings) -> dict[str, Any] | None:
    try:
        messages_service.check_body(body, settings)
    except messages_service.BodyTooLongError as error:
        return {"reason": error.code, **error.details}
    except messages_service.EmptyBodyError as error:
        return {"reason": error.code}
    return None


class BulkPlanner:
    """Sorter of a request's (recipient, body) pairs into accepted and rejected.

    It reads the pairs a slice at a time, in request order, without touching storage. A
    repeat of an earlier accepted message (the same number, and in personalised form the
    same body too) is rejected as `duplicate`, so no recipient gets the same SMS twice.
    """

    def __init__(self, default_region: str | None, settings: Settings) -> None:
        self.plan = BulkPlan()
        self._default_region = default_region
        self._settings = settings
        self._first_index: dict[tuple[str, str], int] = {}
        self._read = 0

    def read(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Sort the next `pairs`; return the accepted ones as (E.164 number, body)."""
        accepted = []
        for index, (number, body) in enumerate(pairs, self._read):
            message = self._accept(index, number, body)
            if message is not None:
                accepted.append(message)
        self._read += len(pairs)
        self.plan.accepted.extend(accepted)
        return accepted

    def _accept(self, index: int, number: str, body: str) -> tuple[str, str] | None:
        rejected = self.plan.rejected
        try:
            to_number = normalize_e164(number, self._default_region)
        except PhoneNumberError as error:
            rejected.append({"index": index, "number": number, "reason": error.reason})
            return None

        body_rejection = _body_rejection(body, self._settings)
        if body_rejection is not None:
            rejected.append({"index": index, "number": number, **body_rejection})
            return None

        key = (to_number, body)
        if key in self._first_index:
            rejected.append(
                {
                    "index": index,
                    "number": number,
                    "reason": REASON_DUPLICATE,
                    "duplicate_of": self._first_index[key],
                }
            )
            return None
        self._first_index[key] = index
        return key


class _ColumnBuilder:
    """Builder of the INSERT columns of a bulk send's accepted messages."""

    def __init__(
        self,
        user: User,
        device_id: uuid.UUID | None,
        task_id: uuid.UUID,
        expires_at: datetime | None,
        shared_body: str | None,
    ) -> None:
        self._user = user
        self._device_id = device_id
        self._expires_at = expires_at
        self._shared_body = shared_body
        values = {**self._values(shared_body or ""), "bulk_id": task_id}
        names = list(repository.SHARED_COLUMNS)
        if shared_body is not None:
            names += repository.BODY_COLUMNS
        self._shared = {name: values[name] for name in names}
        # Segments are counted once per distinct body.
        self._bodies: dict[str, dict[str, Any]] = {}
        self.message_ids: list[uuid.UUID] = []

    def build(self, accepted: list[tuple[str, str]]) -> repository.MessageColumns:
        """Return the columns of (E.164 number, body) messages, each with a new id."""
        columns = repository.MessageColumns(shared=self._shared)
        for to_number, body in accepted:
            columns.ids.append(uuid.uuid4())
            columns.to_numbers.append(to_number)
            if self._shared_body is None:
                values = self._bodies.get(body)
                if values is None:
                    values = self._bodies[body] = self._values(body)
                columns.bodies.append(body)
                columns.segments.append(values["segments"])
                columns.encodings.append(values["encoding"])
        self.message_ids.extend(columns.ids)
        return columns

    def _values(self, body: str) -> dict[str, Any]:
        return messages_service.outgoing_values(
            self._user, "", body, self._device_id, self._expires_at
        )


def _replay(existing: SMSBulkTask, request_hash: str) -> BulkOutcome:
    if existing.request_hash != request_hash:
        raise messages_service.IdempotencyKeyReusedError()
    return BulkOutcome(task=existing, created=False)


async def send_bulk(
    session: AsyncSession,
    settings: Settings,
    user: User,
    data: BulkSendRequest,
    idempotency_key: str | None,
) -> BulkOutcome:
    """Validate, store and charge the messages of a bulk send, and commit.

    The caller then passes a created task to signal_dispatcher.

    Raises TooManyRecipientsError, NoValidRecipientsError, the single send's errors for
    the shared `body` and the device, and QuotaExceededError when the accepted messages
    do not all fit in this month's quota (then nothing is created).
    """
    # Looked up before validating, as in the single send, so that a repeat returns the
    # first result even if, say, BULK_MAX_RECIPIENTS has been lowered since.
    request_hash = _request_hash(data)
    if idempotency_key is not None:
        existing = await repository.get_task_by_idempotency_key(
            session, user.id, idempotency_key
        )
        if existing is not None:
            return _replay(existing, request_hash)

    pairs = data.pairs()
    if len(pairs) > settings.BULK_MAX_RECIPIENTS:
        raise TooManyRecipientsError(len(pairs), settings.BULK_MAX_RECIPIENTS)

    # A body shared by every recipient that cannot be sent is an error of the request.
    if data.body is not None:
        messages_service.check_body(data.body, settings)
    expires_at = messages_service.resolve_expiry(data)
    await messages_service.check_sending_device(session, user, data.device_id)

    # The task goes first, as in the single send: a concurrent repeat with the same key
    # waits on this insert and then replays the task instead of meeting a spent quota.
    # Its message ids and rejections are stored once every recipient has been read.
    task = SMSBulkTask(
        id=uuid.uuid4(),
        user_id=user.id,
        requested_device_id=data.device_id,
        total_recipients=len(pairs),
        message_ids=[],
        rejected=[],
        idempotency_key=idempotency_key,
        request_hash=request_hash if idempotency_key else None,
    )
    if not await repository.insert_task(session, _task_values(task)):
        assert idempotency_key is not None
        existing = await repository.get_task_by_idempotency_key(
            session, user.id, idempotency_key
        )
        if existing is None:
            raise RuntimeError(
                "insert conflicted on the idempotency key, but no task has that key"
            )
        return _replay(existing, request_hash)

    builder = _ColumnBuilder(user, data.device_id, task.id, expires_at, data.body)
    plan = await _charge_and_insert(session, settings, user, pairs, builder)
    task.message_ids = builder.message_ids
    task.rejected = plan.rejected
    await repository.complete_task(session, task.id, task.message_ids, task.rejected)
    await session.commit()

    logger.info(
        "bulk send accepted",
        user_id=str(user.id),
        task_id=str(task.id),
        device_id=str(data.device_id) if data.device_id else None,
        accepted=len(plan.accepted),
        rejected=len(plan.rejected),
    )
    return BulkOutcome(task=task, created=True)


async def _charge_and_insert(
    session: AsyncSession,
    settings: Settings,
    user: User,
    pairs: list[tuple[str, str]],
    builder: _ColumnBuilder,
) -> BulkPlan:
    """Read every recipient, then charge and insert the accepted ones; return the plan.

    With room for every recipient, the quota is charged for all of them first, and each
    chunk of messages is inserted while the next is validated. The charge of the
    rejected ones is given back at the end. Otherwise every recipient is read first and
    the accepted ones are charged exactly, so that a refusal gives how many fit.
    """
    charged_all = await quotas_service.try_charge_sms(
        session, user.id, len(pairs), settings
    )
    planner = BulkPlanner(user.default_region, settings)
    writer = await repository.MessageWriter.open(session)
    try:
        for start in range(0, len(pairs), INSERT_CHUNK):
            accepted = planner.read(pairs[start : start + INSERT_CHUNK])
            if charged_all and accepted:
                await writer.write(builder.build(accepted))
        await writer.flush()
    except BaseException:
        await writer.settle()
        raise

    plan = planner.plan
    if not plan.accepted:
        raise NoValidRecipientsError(plan.rejected)
    if charged_all:
        if len(plan.accepted) < len(pairs):
            await quotas_service.release_sms(
                session, user.id, len(pairs) - len(plan.accepted)
            )
    else:
        await quotas_service.charge_sms(
            session, user.id, len(plan.accepted), settings, bulk=True
        )
        await writer.write(builder.build(plan.accepted))
        await writer.flush()
    return plan


def _task_values(task: SMSBulkTask) -> dict[str, Any]:
    return {
        "id": task.id,
        "user_id": task.user_id,
        "requested_device_id": task.requested_device_id,
        "total_recipients": task.total_recipients,
        "message_ids": task.message_ids,
        "rejected": task.rejected,
        "idempotency_key": task.idempotency_key,
        "request_hash": task.request_hash,
    }


async def signal_dispatcher(redis: Redis, keys: RedisKeys, task: SMSBulkTask) -> None:
    """Tell the dispatcher about the committed messages of a new bulk task.

    A failure is logged and not raised, because the dispatcher's sweep of pending
    messages sends them later anyway.
    """
    try:
        await queues.signal_new_messages(redis, keys, task.message_ids)
    except RedisError:
        logger.exception("signalling the dispatcher failed", task_id=str(task.id))


async def get_progress(
    session: AsyncSession, user: User, task_id: uuid.UUID
) -> BulkProgressCounts:
    task = await repository.get_task(session, user.id, task_id)
    if task is None:
        raise BulkTaskNotFoundError(task_id)
    found = await repository.count_by_status(session, user.id, task_id)
    counts = {status: found.get(status, 0) for status in OUTGOING_STATUSES}
    return BulkProgressCounts(task=task, counts=counts)


async def cancel_bulk(
    session: AsyncSession,
    redis: Redis,
    keys: RedisKeys,
    settings: Settings,
    user: User,
    task_id: uuid.UUID,
) -> BulkCancelOutcome:
    """Cancel every message of the task that no phone has claimed, and return the
    task's progress afterwards.

    Each batch of CANCEL_BATCH_SIZE messages is locked in id order, the order of the
    device-hub's report batches, then cancelled and committed. After the commit its
    tasks leave the device streams and its webhooks are queued. If a batch fails, the
    earlier ones stay cancelled, and repeating the request cancels the rest. Messages
    that a phone has claimed, and those that have ended, stay as they are. Raises
    BulkTaskNotFoundError for a task that does not exist or belongs to another user.
    """
    task = await repository.get_task(session, user.id, task_id)
    if task is None:
        raise BulkTaskNotFoundError(task_id)

    message_ids = await repository.list_unclaimed_ids(session, user.id, task_id)
    cancelled = 0
    for start in range(0, len(message_ids), CANCEL_BATCH_SIZE):
        batch = cancellation.Cancellation()
        locked = await message_attempts.lock_messages(
            session, message_ids[start : start + CANCEL_BATCH_SIZE]
        )
        await cancellation.cancel_locked(session, settings, locked.values(), batch)
        await session.commit()
        await cancellation.finish_cancellation(redis, keys, batch)
        cancelled += len(batch.message_ids)
    if cancelled:
        logger.info(
            "bulk send cancelled",
            user_id=str(user.id),
            task_id=str(task_id),
            cancelled=cancelled,
        )

    progress = await get_progress(session, user, task_id)
    return BulkCancelOutcome(progress, cancelled)
