"""Applying the phones' `sms_report`s in batches, several phones' reports per transaction.

A phone reports `sending`, `sent` and `delivered` for every task, so under send load the
reports are most of the hub's Postgres work. The ReportWriter applies every report queued
so far in one transaction: one query locks the messages of the batch, each report applies
with the rules of mensajero_hub.core.reports, and the transaction commits once. Plain
forward moves (`sending`, `sent` or `delivered` of a whole message on its current
attempt), which are most reports, share two statements for the whole batch. Each caller
gets its outcome only after the commit, so an `ack` still names committed data.

- The batch locks its messages in id order, so two hubs whose batches share messages
  wait for each other instead of deadlocking.
- A batch holds at most one report per message, because the rules read the message as it
  was locked at the start of the batch. A second report of the same message waits for
  the next batch, in arrival order.
- A report rejected by the rules (report_not_allowed) has written nothing, so the others
  of its batch go on. Any other failure aborts the whole transaction, and then each
  report of the batch is applied again alone, in a transaction of its own, so that one
  bad report fails only its own frame.
- A batch waits for every row lock it takes, so a message that another transaction holds
  (a dispatcher moving or ending its task) delays the acks of the whole batch, not only
  of its own report. Those transactions are short.
"""

import asyncio
import uuid
from dataclasses import dataclass, field

import structlog
from arq.connections import ArqRedis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common import message_attempts, queues, webhook_outbox, webhooks
from mensajero_common.db import session_scope
from mensajero_common.keys import RedisKeys
from mensajero_common.message_attempts import LockedMessage
from mensajero_common.models import MessageStatus
from mensajero_common.protocol import SmsReportFrame
from mensajero_common.settings import Settings
from mensajero_hub.core import reports, repository
from mensajero_hub.core.frames import FrameRejectedError

log = structlog.get_logger(__name__)

# Reports per transaction; a bound on the locks one transaction holds and on its length.
MAX_BATCH_SIZE = 200

STATUS_EVENTS = {
    MessageStatus.SENT: webhooks.EVENT_SMS_SENT,
    MessageStatus.DELIVERED: webhooks.EVENT_SMS_DELIVERED,
    MessageStatus.FAILED: webhooks.EVENT_SMS_FAILED,
}


# A report's outcome, or the error that failed it.
Result = reports.ReportOutcome | Exception


@dataclass
class QueuedReport:
    device_id: uuid.UUID
    frame: SmsReportFrame
    future: "asyncio.Future[reports.ReportOutcome]"


@dataclass
class ReportWriter:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    redis: ArqRedis
    keys: RedisKeys
    max_batch_size: int = MAX_BATCH_SIZE
    _pending: list[QueuedReport] = field(default_factory=list)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _worker: "asyncio.Task[None] | None" = None
    _stopping: bool = False

    def start(self) -> None:
        self._worker = asyncio.create_task(self._write_forever(), name="report-writer")

    async def stop(self) -> None:
        """Apply what is still queued, then stop."""
        self._stopping = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker

    async def apply(
        self, device_id: uuid.UUID, frame: SmsReportFrame
    ) -> reports.ReportOutcome:
        """Queue a report of this device; return its outcome once its batch committed.

        Raises what applying it alone would raise: FrameRejectedError when the rules
        reject it, or the database or Redis error that failed it.
        """
        if self._worker is None or self._worker.done():
            raise RuntimeError("the report writer is not running")
        future: asyncio.Future[reports.ReportOutcome] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending.append(QueuedReport(device_id, frame, future))
        self._wakeup.set()
        return await future

    async def _write_forever(self) -> None:
        while True:
            if not self._pending:
                if self._stopping:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue

            batch = self._take_batch()
            try:
                results = await self._write(batch)
            except Exception as error:
                # Not expected: _write turns each report's failure into its result. The
                # writer goes on, so later reports do not wait forever.
                log.exception("report batch failed", count=len(batch))
                results = [error] * len(batch)
            for item, result in zip(batch, results, strict=True):
                _resolve(item, result)

    def _take_batch(self) -> list[QueuedReport]:
        """Take the oldest queued reports, at most one per message."""
        batch: list[QueuedReport] = []
        left: list[QueuedReport] = []
        message_ids: set[uuid.UUID] = set()
        for item in self._pending:
            message_id = item.frame.message_id
            if len(batch) >= self.max_batch_size or message_id in message_ids:
                left.append(item)
                continue
            message_ids.add(message_id)
            batch.append(item)
        self._pending = left
        return batch

    async def _write(self, batch: list[QueuedReport]) -> list[Result]:
        """Apply and commit the batch, then do its Redis work; return each report's
        outcome or error, in batch order."""
        try:
            results = await self._commit(batch)
        except Exception as error:
            if len(batch) == 1:
                return [error]
            log.warning(
                "report batch failed; applying its reports one by one",
                count=len(batch),
                error=repr(error),
            )
            results = [await self._commit_alone(item) for item in batch]

        outcomes = [
            (index, item, result)
            for index, (item, result) in enumerate(zip(batch, results, strict=True))
            if isinstance(result, reports.ReportOutcome)
        ]
        await self._queue_webhooks(
            [
                delivery
                for _, _, outcome in outcomes
                for delivery in outcome.delivery_ids
            ]
        )
        removals = [
            (index, item, outcome)
            for index, item, outcome in outcomes
            if outcome.remove_up_to_attempt is not None
        ]
        try:
            await self._remove_tasks(removals)
        except Exception as error:
            # The reports are committed, but their phones get an error and report again.
            # The repeated reports change nothing and remove the entries.
            log.warning(
                "removing finished tasks failed", count=len(removals), error=repr(error)
            )
            for index, _, _ in removals:
                results[index] = error
        return results

    async def _commit_alone(self, item: QueuedReport) -> Result:
        try:
            (result,) = await self._commit([item])
        except Exception as error:
            return error
        return result

    async def _commit(self, batch: list[QueuedReport]) -> list[Result]:
        """Apply the reports in one transaction and commit it.

        Returns, in batch order, each report's outcome or the FrameRejectedError that
        rejected it. Any other error rolls the whole batch back and propagates.
        """
        results: dict[int, Result] = {}
        async with session_scope(self.sessions) as db:
            messages = await message_attempts.lock_messages(
                db, [item.frame.message_id for item in batch]
            )
            # Plain forward moves, most reports, go in one statement for all of them.
            moves: list[tuple[int, uuid.UUID, LockedMessage, MessageStatus]] = []
            for index, item in enumerate(batch):
                message = messages.get(item.frame.message_id)
                status = reports.forward_status(item.device_id, item.frame, message)
                if message is not None and status is not None:
                    moves.append((index, item.device_id, message, status))
                    continue
                try:
                    results[index] = await reports.apply_report(
                        db, self.settings, item.device_id, item.frame, message
                    )
                except FrameRejectedError as error:
                    results[index] = error
            moved = await reports.apply_forward_moves(
                db,
                [
                    (device_id, message, status)
                    for _, device_id, message, status in moves
                ],
            )
            for (index, _, _, _), outcome in zip(moves, moved, strict=True):
                results[index] = outcome

            await _record_status_events(db, batch, results, messages)
        return [results[index] for index in range(len(batch))]

    async def _queue_webhooks(self, delivery_ids: list[uuid.UUID]) -> None:
        if not delivery_ids:
            return
        try:
            await webhook_outbox.queue_deliveries(self.redis, self.keys, delivery_ids)
        except RedisError:
            # The deliveries are committed; the webhook-sender's sweep sends them later.
            log.exception("queueing webhook deliveries failed", count=len(delivery_ids))

    async def _remove_tasks(
        self, removals: list[tuple[int, QueuedReport, reports.ReportOutcome]]
    ) -> None:
        """Delete the stream entries of the attempts these reports ended, in two round
        trips for the whole batch."""
        await queues.remove_device_tasks(
            self.redis,
            self.keys,
            [
                (item.device_id, item.frame.message_id, outcome.remove_up_to_attempt)
                for _, item, outcome in removals
                if outcome.remove_up_to_attempt is not None
            ],
        )


def _resolve(item: QueuedReport, result: Result) -> None:
    if item.future.done():
        return
    if isinstance(result, Exception):
        item.future.set_exception(result)
    else:
        item.future.set_result(result)


def _status_events(
    change: repository.MessageChange, locked: LockedMessage | None
) -> list[tuple[str, MessageStatus]]:
    """Return the webhook events of a status change, each with the status its body names.

    A message that reaches `delivered` without having been `sent` (its phone reported
    `delivered` straight after `sending`, or late after `failed`) gets `sms_sent` first,
    so that a subscriber to `sms_sent` hears of every message that went out.
    """
    events = [(STATUS_EVENTS[change.status], change.status)]
    skipped_sent = locked is None or locked.status is not MessageStatus.SENT
    if change.status is MessageStatus.DELIVERED and skipped_sent:
        events.insert(0, (webhooks.EVENT_SMS_SENT, MessageStatus.SENT))
    return events


async def _record_status_events(
    db: AsyncSession,
    batch: list[QueuedReport],
    results: dict[int, Result],
    messages: dict[uuid.UUID, LockedMessage],
) -> None:
    """Record the webhook events of each status change in the batch, adding their
    deliveries to the report's outcome.

    `messages` holds each message as the batch locked it, before its report applied.
    One query first finds which users subscribe to which events, so that a change
    without a subscribed webhook costs no statement of its own.
    """
    changed: list[tuple[QueuedReport, reports.ReportOutcome, repository.MessageChange]]
    changed = []
    for index, item in enumerate(batch):
        outcome = results[index]
        if not isinstance(outcome, reports.ReportOutcome) or outcome.change is None:
            continue
        if outcome.change.status in STATUS_EVENTS:
            changed.append((item, outcome, outcome.change))
    if not changed:
        return

    wanted = await repository.find_webhook_subscriptions(
        db, {change.user_id for _, _, change in changed}
    )
    for item, outcome, change in changed:
        locked = messages.get(item.frame.message_id)
        for event, status in _status_events(change, locked):
            if (change.user_id, event) not in wanted:
                continue
            outcome.delivery_ids += await webhook_outbox.record_message_event(
                db,
                event=event,
                user_id=change.user_id,
                message_id=item.frame.message_id,
                from_number=change.from_number,
                to_number=change.to_number,
                body=change.body,
                timestamp=change.changed_at,
                device_id=item.device_id,
                status=status.value,
                # Only `sms_failed` carries an error, as the README documents.
                error=change.error if event == webhooks.EVENT_SMS_FAILED else None,
                segments=change.segments,
            )
