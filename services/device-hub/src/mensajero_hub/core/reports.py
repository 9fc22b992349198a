"""Applying an `sms_report`: attempts, per-part reports, retries and final outcomes.

The caller locks the message row for the whole report, so the reports of one message
apply one at a time whatever connection or hub they arrive on. Then:

- a report naming an earlier `attempt` changes nothing: that attempt has ended. So do a
  report naming a later `attempt` and a report from a device whose attempt moved to
  another device;
- a message that is not in flight (`pending` for a retry, or final) does not change;
- a part report is stored per part, forward-only, and the message takes the aggregate of
  its parts (see aggregate_parts). The order the parts arrive in does not matter. A
  failed part leaves the message `sending` until every part has reported, unless a
  part went out, because an unreported part may still go out and a retry would send it
  twice. The dispatcher ends a message whose parts never all report after
  TASK_REPORT_TIMEOUT_S, without a retry;
- `failed` ends the attempt, and the message is retried or ends `failed`
  (mensajero_common.message_attempts decides which). A message that has a part `sent`
  or `delivered`, or that has part reports but not of every part, is never retried, even
  on a report of the whole message;
- `expired` (the phone skipped a task past its `expires_at`) ends the message `expired`,
  unless the SMS or one of its parts went out, in which case it changes nothing;
- `sending`, `sent` and `delivered` move the message forward;
- a late `sent` or `delivered` report on an attempt that ended `failed` on this device
  cancels the retry that the failure queued, while no phone has claimed it (the message
  is `pending`, or `assigned` to a phone that has not reported `sending`), because the
  retry would send the SMS or that part again. A part report is stored for its attempt
  and ends the message `failed`; a report of the whole message ends it `sent` or
  `delivered`. Once the retry is claimed, a part report is only stored and a report of
  the whole message is only logged (see _apply_late_report). A later `delivered` or
  `failed` report of the whole message, with or without `attempt`, applies to the
  attempt that sent the SMS as it would after a `sent` on the current attempt.
"""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common import message_attempts
from mensajero_common.message_attempts import ERROR_EXPIRED, LockedMessage
from mensajero_common.models import (
    AttemptStatus,
    MessageStatus,
    SMSDevice,
    SMSMessage,
    SMSMessageAttempt,
    SMSMessagePart,
)
from mensajero_common.protocol import INVALID_FRAME_PARTS_MISMATCH, SmsReportFrame
from mensajero_common.settings import Settings
from mensajero_common.status import TIMESTAMP_COLUMNS, can_transition
from mensajero_hub.core import repository
from mensajero_hub.core.frames import FrameRejectedError

log = structlog.get_logger(__name__)

# Statuses in which a message takes reports: its current attempt is on a phone.
REPORTABLE_MESSAGE_STATUSES = frozenset(
    {MessageStatus.ASSIGNED, MessageStatus.SENDING, MessageStatus.SENT}
)
SENT_STATUSES = frozenset({MessageStatus.SENT, MessageStatus.DELIVERED})
# Statuses in which no phone has claimed the message's next attempt, so a late report
# that an earlier attempt, or a part of it, went out can still stop that attempt.
UNCLAIMED_RETRY_STATUSES = frozenset({MessageStatus.PENDING, MessageStatus.ASSIGNED})
# The errors of a retry attempt that ended before its phone claimed it, because a late
# report showed that a part of an earlier attempt, or the whole SMS, went out.
ERROR_EARLIER_PART_WENT_OUT = "earlier_part_went_out"
ERROR_EARLIER_ATTEMPT_WENT_OUT = "earlier_attempt_went_out"


@dataclass(frozen=True)
class PartReport:
    part: int
    parts: int
    status: MessageStatus
    error: str | None


@dataclass
class ReportOutcome:
    # The message's status and current attempt after the report, sent back in the `ack`.
    # A phone that reported `sending` sends the SMS only when the `ack` names `sending`
    # and its own attempt.
    status: MessageStatus
    attempt: int
    # A forward move to `sending`, `sent` or `delivered`, whose webhook event the caller
    # records.
    change: repository.MessageChange | None = None
    # Webhook deliveries already recorded (of `sms_failed`), to queue after the commit.
    delivery_ids: list[uuid.UUID] = field(default_factory=list)
    # The task entries of the message up to this attempt leave the device's stream.
    remove_up_to_attempt: int | None = None
    # The report came from a device whose attempt moved to another device.
    moved_away: bool = False


def aggregate_parts(
    parts: Sequence[PartReport], *, went_out: bool = False
) -> tuple[MessageStatus, str | None]:
    """Return the status and error of a message from the reports of its parts.

    A failed part makes the message `failed` once every part has reported, or once a
    part went out, since no retry can follow then. Before that the message stays
    `sending`, so that no retry starts while an unreported part may still go out.
    `went_out` is set when a part went out although no report shows it now: `sent_at`
    is set, or a part's `sent` was replaced by its `failed` delivery report.
    """
    total = max(report.parts for report in parts)
    complete = len(parts) >= total
    went_out = went_out or any(report.status in SENT_STATUSES for report in parts)
    failed = [report for report in parts if report.status is MessageStatus.FAILED]
    if failed and (complete or went_out):
        first = min(failed, key=lambda item: item.part)
        return MessageStatus.FAILED, f"part {first.part}/{total}: {first.error}"
    if complete:
        if all(report.status is MessageStatus.DELIVERED for report in parts):
            return MessageStatus.DELIVERED, None
        if all(report.status in SENT_STATUSES for report in parts):
            return MessageStatus.SENT, None
    return MessageStatus.SENDING, None


@dataclass(frozen=True)
class StoredParts:
    """The part reports of an attempt, after one more was stored."""

    # The latest report of each part that has reported.
    reports: list[PartReport]
    # Whether the reported part went out, also when its stored status does not show
    # it: a `failed` delivery report replaced its `sent`, or forward-only storage
    # dropped a `sent` that came after its `failed`.
    part_went_out: bool


async def _store_part(
    db: AsyncSession, message: LockedMessage, frame: SmsReportFrame, attempt: int
) -> StoredParts:
    """Store one part's report on `attempt` forward-only; return every part report of
    that attempt.

    Raises FrameRejectedError (invalid_frame) and writes nothing when `parts` differs
    from the earlier part reports of the attempt, because the aggregate would then miss
    parts or count some twice.
    """
    assert frame.part is not None and frame.parts is not None
    status = MessageStatus(frame.status)
    stored = (
        await db.execute(
            select(
                SMSMessagePart.part, SMSMessagePart.parts, SMSMessagePart.status
            ).where(
                SMSMessagePart.message_id == message.id,
                SMSMessagePart.attempt_number == attempt,
            )
        )
    ).all()
    stored_parts = {row.parts for row in stored}
    if stored_parts and stored_parts != {frame.parts}:
        raise FrameRejectedError(
            "invalid_frame",
            request_id=frame.request_id,
            reason=INVALID_FRAME_PARTS_MISMATCH,
            parts=max(stored_parts),
        )
    current = next(
        (MessageStatus(row.status) for row in stored if row.part == frame.part), None
    )
    part_went_out = current in SENT_STATUSES or status in SENT_STATUSES
    if current is None or can_transition(current, status):
        values = {
            "parts": frame.parts,
            "status": status.value,
            "error": frame.error,
            "updated_at": func.now(),
        }
        await db.execute(
            pg_insert(SMSMessagePart)
            .values(
                message_id=message.id, attempt_number=attempt, part=frame.part, **values
            )
            .on_conflict_do_update(
                index_elements=["message_id", "attempt_number", "part"], set_=values
            )
        )

    rows = (
        await db.execute(
            select(
                SMSMessagePart.part,
                SMSMessagePart.parts,
                SMSMessagePart.status,
                SMSMessagePart.error,
            ).where(
                SMSMessagePart.message_id == message.id,
                SMSMessagePart.attempt_number == attempt,
            )
        )
    ).all()
    reports = [
        PartReport(row.part, row.parts, MessageStatus(row.status), row.error)
        for row in rows
    ]
    return StoredParts(reports, part_went_out)


async def _parts_may_have_gone_out(db: AsyncSession, message: LockedMessage) -> bool:
    """Return whether a part of the current attempt was reported `sent` or `delivered`,
    or may still go out because part reports exist but not of every part."""
    statement = select(
        func.count(),
        func.max(SMSMessagePart.parts),
        func.count().filter(
            SMSMessagePart.status.in_([status.value for status in SENT_STATUSES])
        ),
    ).where(
        SMSMessagePart.message_id == message.id,
        SMSMessagePart.attempt_number == message.current_attempt,
    )
    reported, parts, sent = (await db.execute(statement)).one()
    return sent > 0 or (reported > 0 and reported < parts)


async def _attempt_of_device(
    db: AsyncSession, message: LockedMessage, device_id: uuid.UUID
) -> int | None:
    """Return the latest attempt of the message that went to this device, if any."""
    statement = select(func.max(SMSMessageAttempt.attempt_number)).where(
        SMSMessageAttempt.message_id == message.id,
        SMSMessageAttempt.device_id == device_id,
    )
    return (await db.execute(statement)).scalar_one_or_none()


async def _failed_attempt(
    db: AsyncSession, message: LockedMessage, attempt: int, device_id: uuid.UUID
) -> SMSMessageAttempt | None:
    """Return `attempt` of the message if it went to this device and ended `failed`."""
    statement = select(SMSMessageAttempt).where(
        SMSMessageAttempt.message_id == message.id,
        SMSMessageAttempt.attempt_number == attempt,
        SMSMessageAttempt.device_id == device_id,
        SMSMessageAttempt.status == AttemptStatus.FAILED.value,
    )
    return (await db.scalars(statement)).first()


async def _apply_late_report(
    db: AsyncSession,
    settings: Settings,
    device_id: uuid.UUID,
    frame: SmsReportFrame,
    message: LockedMessage | None,
) -> ReportOutcome | None:
    """Apply a `sent` or `delivered` report on an attempt that this device ended with a
    `failed` report, or a report that follows such a late `sent` (see
    _apply_after_late_sent). Return None when the frame is not such a report.

    A part report is stored on that attempt forward-only, so a `failed` part stays
    `failed`. If no phone has claimed the next attempt yet, it is cancelled, because it
    would send the SMS or the part again. An assigned next attempt ends `failed`, so the
    `ack` of its phone's claim names a status other than `sending` and that phone does
    not send. Then a part report ends the message `failed` (see _end_failed_by_part) and
    a report of the whole message records its outcome (see _record_late_outcome).

    Also returns None, after storing a part, when the message is final or its next
    attempt was claimed. That phone may have sent the SMS already, so its own reports
    decide the message.
    """
    if message is None:
        return None
    status = MessageStatus(frame.status)
    if status not in SENT_STATUSES and status is not MessageStatus.FAILED:
        return None
    attempt = frame.attempt or await _unnumbered_report_attempt(
        db, device_id, frame, message
    )
    if attempt > message.current_attempt:
        return None
    if attempt == message.current_attempt and message.status in (
        REPORTABLE_MESSAGE_STATUSES
    ):
        return None
    # Only a `sent` or `delivered` report cancels a retry. A `failed` report on an
    # earlier attempt applies only when a late `sent` made that attempt the outcome.
    ended = None
    if status in SENT_STATUSES:
        ended = await _failed_attempt(db, message, attempt, device_id)
    if ended is None:
        return await _apply_after_late_sent(
            db, settings, device_id, frame, message, attempt
        )

    if frame.part is not None:
        await _store_part(db, message, frame, attempt)
    if message.status not in UNCLAIMED_RETRY_STATUSES:
        return _late_report_outcome(
            "late report on a failed attempt left the message unchanged",
            device_id,
            frame,
            message,
            attempt,
        )

    if message.status is MessageStatus.ASSIGNED:
        error = (
            ERROR_EARLIER_ATTEMPT_WENT_OUT
            if frame.part is None
            else ERROR_EARLIER_PART_WENT_OUT
        )
        await message_attempts.record_attempt_status(
            db, message, AttemptStatus.FAILED, error=error
        )
    # The message ends as sent by this device, whose attempt sent the SMS: a `pending`
    # message still has this device's number as `from`, an `assigned` one the retry
    # phone's number.
    if message.status is MessageStatus.PENDING and message.from_number is not None:
        from_number: str | None = message.from_number
    else:
        from_number = await _device_number(db, device_id)
    cancelled = "retry cancelled by a late report"
    if frame.part is not None:
        delivery_ids = await _end_failed_by_part(
            db, settings, device_id, message, ended, from_number
        )
        return _late_report_outcome(
            cancelled,
            device_id,
            frame,
            message,
            attempt,
            MessageStatus.FAILED,
            delivery_ids=delivery_ids,
        )
    change = await _record_late_outcome(
        db, device_id, message, attempt, MessageStatus(frame.status), from_number
    )
    return _late_report_outcome(
        cancelled, device_id, frame, message, attempt, change.status, change=change
    )


def _late_report_outcome(
    event: str,
    device_id: uuid.UUID,
    frame: SmsReportFrame,
    message: LockedMessage,
    attempt: int,
    status: MessageStatus | None = None,
    *,
    change: repository.MessageChange | None = None,
    delivery_ids: list[uuid.UUID] | None = None,
) -> ReportOutcome | None:
    """Log `event` for a late report on `attempt`, an ended attempt of this device, and
    return the report's outcome.

    `status` is the message's status after the report. Without it the report left the
    message unchanged, and None is returned so that apply_report applies its usual
    rules. An outcome names the current attempt, whose task entries and all earlier
    ones leave the device's stream, because the message has ended or its SMS went out.
    """
    log.info(
        event,
        message_id=str(message.id),
        device_id=str(device_id),
        reported_attempt=attempt,
        attempt=message.current_attempt,
        message_status=(status or message.status).value,
        part=frame.part,
        status=frame.status,
    )
    if status is None:
        return None
    return ReportOutcome(
        status,
        message.current_attempt,
        change=change,
        delivery_ids=delivery_ids or [],
        remove_up_to_attempt=message.current_attempt,
    )


async def _end_failed_by_part(
    db: AsyncSession,
    settings: Settings,
    device_id: uuid.UUID,
    message: LockedMessage,
    ended: SMSMessageAttempt,
    from_number: str | None,
) -> list[uuid.UUID]:
    """End the message `failed` with the error of the `ended` attempt, whose part went
    out, and return the webhook deliveries to queue. As with any failure after a part
    went out, `sms_failed` is recorded and the quota charge is kept."""
    sender = replace(
        message,
        status=MessageStatus.SENDING,
        device_id=device_id,
        from_number=from_number,
    )
    return await message_attempts.end_failed(
        db, settings, sender, ended.error, refund=False
    )


async def _record_late_outcome(
    db: AsyncSession,
    device_id: uuid.UUID,
    message: LockedMessage,
    attempt: int,
    status: MessageStatus,
    from_number: str | None,
) -> repository.MessageChange:
    """Move the message to `status` (`sent` or `delivered`) as sent by this device's
    `attempt`, and move that attempt from `failed` or `sent` to `status`.

    The message gets this device as `device_id`, the status's timestamp, and no error or
    `next_attempt_at`. The quota charge stays, because the SMS went out. The attempt
    keeps the error of its `failed` report, so its history still shows that report.
    """
    timestamp_column = TIMESTAMP_COLUMNS[status]
    values: dict[str, object] = {
        "status": status.value,
        timestamp_column: func.now(),
        "error": None,
        "next_attempt_at": None,
        "device_id": device_id,
        "from_number": from_number,
    }
    if status is MessageStatus.DELIVERED:
        values["sent_at"] = func.coalesce(SMSMessage.sent_at, func.now())
    statement = (
        update(SMSMessage)
        .where(SMSMessage.id == message.id, SMSMessage.status == message.status.value)
        .values(values)
        .returning(
            SMSMessage.user_id,
            SMSMessage.from_number,
            SMSMessage.to_number,
            SMSMessage.body,
            SMSMessage.segments,
            getattr(SMSMessage, timestamp_column),
        )
    )
    row = (await db.execute(statement)).one()
    # A `sent` attempt has not ended until its delivery is reported, as for a report on
    # the current attempt.
    ended_at = func.now() if status is MessageStatus.DELIVERED else None
    await db.execute(
        update(SMSMessageAttempt)
        .where(
            SMSMessageAttempt.message_id == message.id,
            SMSMessageAttempt.attempt_number == attempt,
            SMSMessageAttempt.status.in_(
                [AttemptStatus.FAILED.value, AttemptStatus.SENT.value]
            ),
        )
        .values(status=status.value, ended_at=ended_at)
    )
    return repository.MessageChange(
        status,
        row.user_id,
        row.from_number,
        row.to_number,
        row.body,
        row.segments,
        None,
        row[5],
    )


async def _apply_after_late_sent(
    db: AsyncSession,
    settings: Settings,
    device_id: uuid.UUID,
    frame: SmsReportFrame,
    message: LockedMessage,
    attempt: int,
) -> ReportOutcome | None:
    """Apply a `delivered` or `failed` report of the whole message on an earlier attempt
    of this device that a late `sent` report made the message's outcome (see
    _record_late_outcome). Return None for any other report.

    A later attempt exists when the late `sent` cancelled an assigned retry, so without
    this step the report would be ignored as one on an ended attempt. Each report
    applies as after a `sent` on the current attempt: `delivered` moves the message and
    that attempt to `delivered`. `failed` is a delivery failure, so both end `failed`
    with the report's error, `sms_failed` is recorded, and the quota charge stays.
    """
    if not _may_follow_late_sent(device_id, frame, message):
        return None
    statement = select(SMSMessageAttempt.id).where(
        SMSMessageAttempt.message_id == message.id,
        SMSMessageAttempt.attempt_number == attempt,
        SMSMessageAttempt.device_id == device_id,
        SMSMessageAttempt.status == AttemptStatus.SENT.value,
    )
    if (await db.execute(statement)).first() is None:
        return None

    event = "late delivery report applied to an earlier attempt"
    if MessageStatus(frame.status) is MessageStatus.FAILED:
        await message_attempts.record_attempt_status(
            db, message, AttemptStatus.FAILED, attempt_number=attempt, error=frame.error
        )
        delivery_ids = await message_attempts.end_failed(
            db, settings, message, frame.error, refund=False
        )
        return _late_report_outcome(
            event,
            device_id,
            frame,
            message,
            attempt,
            MessageStatus.FAILED,
            delivery_ids=delivery_ids,
        )
    change = await _record_late_outcome(
        db, device_id, message, attempt, MessageStatus.DELIVERED, message.from_number
    )
    return _late_report_outcome(
        event, device_id, frame, message, attempt, change.status, change=change
    )


def _may_follow_late_sent(
    device_id: uuid.UUID, frame: SmsReportFrame, message: LockedMessage
) -> bool:
    """Return whether the frame may be a `delivered` or `failed` report of the whole
    message on an earlier attempt that a late `sent` made the message's outcome.

    Such a message is `sent` by this device and has had a retry, which that late `sent`
    cancelled. A retry that sent the SMS itself matches too, so the attempt rows decide.
    """
    status = MessageStatus(frame.status)
    return (
        frame.part is None
        and status in (MessageStatus.DELIVERED, MessageStatus.FAILED)
        and message.status is MessageStatus.SENT
        and message.device_id == device_id
        and message.current_attempt > 1
    )


async def _unnumbered_report_attempt(
    db: AsyncSession,
    device_id: uuid.UUID,
    frame: SmsReportFrame,
    message: LockedMessage,
) -> int:
    """Return the attempt that a report without `attempt` applies to.

    That is the current attempt, except for a `delivered` or `failed` report after a
    late `sent` cancelled an assigned retry. The current attempt is then that retry,
    which ended `failed` without sending, and the report applies to this device's
    `sent` attempt, whose SMS went out.
    """
    if not _may_follow_late_sent(device_id, frame, message):
        return message.current_attempt
    statement = select(func.max(SMSMessageAttempt.attempt_number)).where(
        SMSMessageAttempt.message_id == message.id,
        SMSMessageAttempt.device_id == device_id,
        SMSMessageAttempt.status == AttemptStatus.SENT.value,
    )
    sent = (await db.execute(statement)).scalar_one_or_none()
    return sent or message.current_attempt


async def _device_number(db: AsyncSession, device_id: uuid.UUID) -> str | None:
    statement = select(SMSDevice.phone_number).where(SMSDevice.id == device_id)
    return (await db.execute(statement)).scalar_one_or_none()


def _moved_away(
    message: LockedMessage,
    device_id: uuid.UUID,
    moved_from: int,
    frame: SmsReportFrame,
) -> ReportOutcome:
    """Answer a report on an ended attempt of this device, changing nothing, when the
    message is now on another device (moved, or retried there).

    A phone that follows the protocol has not sent the SMS of a moved attempt: it sends
    only once the `ack` of its `sending` report names its own attempt.
    """
    log.info(
        "report on an attempt now on another device ignored",
        message_id=str(message.id),
        device_id=str(device_id),
        moved_from_attempt=moved_from,
        attempt=message.current_attempt,
        status=frame.status,
    )
    return ReportOutcome(
        message.status,
        message.current_attempt,
        remove_up_to_attempt=moved_from,
        moved_away=True,
    )


def forward_status(
    device_id: uuid.UUID, frame: SmsReportFrame, message: LockedMessage | None
) -> MessageStatus | None:
    """Return the status a report moves its message to, when only the forward rule
    applies to it; None when apply_report has to apply it.

    That is a report of this device on its message's current attempt, while the message
    is in flight, of the whole message (no `part`), with `sending`, `sent` or
    `delivered`: most reports, and the ones apply_forward_moves applies in bulk.
    """
    if message is None or message.device_id != device_id:
        return None
    if frame.attempt is not None and frame.attempt != message.current_attempt:
        return None
    if frame.attempt is None and _may_follow_late_sent(device_id, frame, message):
        # The report may apply to an earlier attempt, which apply_report looks up (see
        # _unnumbered_report_attempt).
        return None
    if message.status not in REPORTABLE_MESSAGE_STATUSES or frame.part is not None:
        return None
    status = MessageStatus(frame.status)
    return status if status in repository.FORWARD_STATUSES else None


async def apply_forward_moves(
    db: AsyncSession,
    moves: Sequence[tuple[uuid.UUID, LockedMessage, MessageStatus]],
) -> list[ReportOutcome]:
    """Apply reports that forward_status accepted, each a (device id, locked message,
    status), in two statements for all of them; return their outcomes in order.

    Each outcome is the one apply_report would return. The messages must be distinct,
    since each move starts from the status its message was locked with.
    """
    wanted = [
        repository.ForwardMove(message.id, device_id, message.status, status)
        for device_id, message, status in moves
        if can_transition(message.status, status)
    ]
    changes = await repository.advance_messages(db, wanted)
    await message_attempts.record_attempt_moves(
        db,
        [
            (message, AttemptStatus(changes[message.id].status.value))
            for _, message, _ in moves
            if message.id in changes
        ],
    )

    outcomes = []
    for _, message, status in moves:
        attempt = message.current_attempt
        change = changes.get(message.id)
        if change is None:
            # A repeated or late report; the task leaves the stream once the SMS went out.
            done = message.status in SENT_STATUSES or status in SENT_STATUSES
            outcomes.append(
                ReportOutcome(
                    message.status,
                    attempt,
                    remove_up_to_attempt=attempt if done else None,
                )
            )
            continue
        outcomes.append(
            ReportOutcome(
                change.status,
                attempt,
                change=change,
                remove_up_to_attempt=attempt
                if change.status in SENT_STATUSES
                else None,
            )
        )
    return outcomes


async def _apply_expired(
    db: AsyncSession, settings: Settings, message: LockedMessage, went_out: bool
) -> ReportOutcome | None:
    """Apply an `expired` report, or return None when the message has no `expires_at`
    and the caller has to apply the report as a failure."""
    attempt = message.current_attempt
    if went_out:
        # `expired` means that the phone skipped the task, which contradicts its earlier
        # report that the SMS or one of its parts went out.
        return ReportOutcome(message.status, attempt)
    if message.expires_at is None:
        return None

    expired = await message_attempts.expire_message(db, settings, message)
    if expired is None:
        return ReportOutcome(message.status, attempt)
    return ReportOutcome(
        MessageStatus.EXPIRED,
        attempt,
        delivery_ids=expired.delivery_ids,
        remove_up_to_attempt=attempt,
    )


def _ignored_report(
    device_id: uuid.UUID, frame: SmsReportFrame, message: LockedMessage
) -> ReportOutcome | None:
    """Return the outcome of a report that changes nothing, because it names another
    attempt or its message is not in flight. Return None for a report to apply."""
    attempt = message.current_attempt
    if frame.attempt is not None and frame.attempt != attempt:
        log.info(
            "report on an ended attempt ignored",
            message_id=str(message.id),
            device_id=str(device_id),
            reported_attempt=frame.attempt,
            attempt=attempt,
            status=frame.status,
        )
        # Only the entries of an ended attempt leave the stream. A report naming an
        # attempt that has not started yet is wrong and must not drop the current task.
        ended = frame.attempt if frame.attempt < attempt else None
        return ReportOutcome(message.status, attempt, remove_up_to_attempt=ended)
    if message.status not in REPORTABLE_MESSAGE_STATUSES:
        return ReportOutcome(message.status, attempt, remove_up_to_attempt=attempt)
    return None


async def apply_report(
    db: AsyncSession,
    settings: Settings,
    device_id: uuid.UUID,
    frame: SmsReportFrame,
    message: LockedMessage | None,
) -> ReportOutcome:
    """Apply one report of this device in the caller's transaction.

    `message` is the report's message as the caller locked it in this transaction, or
    None when no outgoing message has that id. Raises FrameRejectedError
    (report_not_allowed) when the message is not an outgoing message assigned to this
    device, and then has written nothing.
    """
    late = await _apply_late_report(db, settings, device_id, frame, message)
    if late is not None:
        return late
    if message is not None and message.device_id != device_id:
        moved_from = await _attempt_of_device(db, message, device_id)
        if moved_from is not None:
            return _moved_away(message, device_id, moved_from, frame)
    if message is None or message.device_id != device_id:
        raise FrameRejectedError(
            "report_not_allowed",
            request_id=frame.request_id,
            details={"message_id": str(frame.message_id)},
            message_id=str(frame.message_id),
        )

    ignored = _ignored_report(device_id, frame, message)
    if ignored is not None:
        return ignored
    attempt = message.current_attempt

    status, error = MessageStatus(frame.status), frame.error
    went_out = message.sent_at is not None
    parts: int | None = None
    if frame.part is not None and status is not MessageStatus.EXPIRED:
        stored = await _store_part(db, message, frame, attempt)
        went_out = went_out or stored.part_went_out
        status, error = aggregate_parts(stored.reports, went_out=went_out)
        parts = max(report.parts for report in stored.reports)
        went_out = went_out or any(
            report.status in SENT_STATUSES for report in stored.reports
        )
    elif status in (MessageStatus.FAILED, MessageStatus.EXPIRED) and not went_out:
        # A report of the whole message can follow part reports. A part that went out,
        # or one not yet reported, rules out a retry, as `sent_at` does.
        went_out = await _parts_may_have_gone_out(db, message)

    if status is MessageStatus.EXPIRED:
        outcome = await _apply_expired(db, settings, message, went_out)
        if outcome is not None:
            return outcome
        # A task without `expires_at` cannot expire: the phone skipped it anyway, so it
        # failed without going out.
        status, error = MessageStatus.FAILED, error or ERROR_EXPIRED

    if status is MessageStatus.FAILED:
        end = await message_attempts.fail_attempt(
            db,
            settings,
            message,
            error,
            retryable=frame.retryable and not went_out,
        )
        log.info(
            "attempt failed",
            message_id=str(message.id),
            device_id=str(device_id),
            attempt=attempt,
            retry=end.status is MessageStatus.PENDING,
        )
        return ReportOutcome(
            end.status,
            attempt,
            delivery_ids=end.delivery_ids,
            remove_up_to_attempt=attempt,
        )

    change = await repository.advance_message_status(
        db, device_id, message.id, status, error
    )
    if change is None:
        # A repeated or late report; the task leaves the stream once the SMS went out.
        done = message.status in SENT_STATUSES or status in SENT_STATUSES
        return ReportOutcome(
            message.status, attempt, remove_up_to_attempt=attempt if done else None
        )
    await message_attempts.record_attempt_status(
        db, message, AttemptStatus(change.status.value), parts=parts
    )
    done = change.status in SENT_STATUSES
    return ReportOutcome(
        change.status,
        attempt,
        change=change,
        remove_up_to_attempt=attempt if done else None,
    )
