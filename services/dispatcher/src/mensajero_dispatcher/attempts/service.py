"""Deadlines of attempts and expiry of messages, checked every MESSAGE_CHECK_INTERVAL_S.

- A task that no phone acknowledged (no `sending` report) within TASK_ACK_TIMEOUT_S, on
  a device that is offline or silent, moves to another online device of the user as a
  new attempt, unless the sender asked for its device. On a device that is alive it
  moves only after STUCK_DEVICE_FACTOR times as long. A phone sends only once the hub
  confirms its claim of the attempt, so a moved task goes out once.
- A task acknowledged but not finished within TASK_REPORT_TIMEOUT_S ends `failed` with
  the error `no_report`. It is never sent elsewhere, since the SMS may have gone out.
- A message not sent by its `expires_at` ends `expired` and is never pushed again.
- A task whose device was deleted ends at once: see `end_tasks_of_deleted_devices`.

Each check commits a batch, then removes the tasks of the attempts it ended from their
device streams and queues the webhook deliveries. A crash in between leaves stream
entries that the hub drops as stale when it reads them.
"""

import uuid
from collections.abc import Awaitable, Callable, Sequence

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common import message_attempts, queues
from mensajero_common.db import session_scope
from mensajero_common.message_attempts import (
    ERROR_NO_ACK,
    ERROR_NO_REPORT,
    AttemptEnd,
)
from mensajero_common.models import AttemptStatus, MessageStatus
from mensajero_common.settings import Settings
from mensajero_common.webhook_outbox import queue_deliveries
from mensajero_dispatcher.attempts import repository
from mensajero_dispatcher.attempts.repository import StalledTask
from mensajero_dispatcher.context import DispatcherContext
from mensajero_dispatcher.messages.service import (
    REQUESTED_DEVICE_DELETED,
    assign_messages,
)

log = structlog.get_logger(__name__)

BATCH_SIZE = 100
# A task unacknowledged on a device that is connected and alive moves only after this
# many TASK_ACK_TIMEOUT_S: the phone takes no tasks although it pings.
STUCK_DEVICE_FACTOR = 10
# A device counts as silent once it wrote no heartbeat for this many ping intervals; a
# live connection's heartbeat is at most two and a half intervals old (the hub writes it
# on every second ping).
SILENT_PING_INTERVALS = 3

# The error of an attempt that ended because its device was deleted.
ERROR_DEVICE_DELETED = "device_deleted"

LockStalled = Callable[[AsyncSession], Awaitable[list[StalledTask]]]
EndTask = Callable[[AsyncSession, StalledTask], Awaitable[AttemptEnd | None]]


async def _remove_tasks(ctx: DispatcherContext, tasks: Sequence[StalledTask]) -> None:
    for task in tasks:
        if task.device_id is None:
            continue
        await queues.remove_device_task(
            ctx.redis,
            ctx.keys,
            task.device_id,
            task.message_id,
            up_to_attempt=task.attempt,
        )


async def _end_in_batches(
    ctx: DispatcherContext, lock: LockStalled, end: EndTask
) -> list[tuple[StalledTask, AttemptEnd]]:
    """End stalled tasks batch by batch and return the ones ended.

    Each batch is locked with `lock` and ended with `end` in one transaction. After the
    commit, the tasks leave their streams and the webhooks are queued.
    """
    ended: list[tuple[StalledTask, AttemptEnd]] = []
    while True:
        batch: list[tuple[StalledTask, AttemptEnd]] = []
        async with session_scope(ctx.session_factory) as session:
            locked = await lock(session)
            for task in locked:
                outcome = await end(session, task)
                if outcome is not None:
                    batch.append((task, outcome))

        await _remove_tasks(ctx, [task for task, _ in batch])
        delivery_ids = [item for _, outcome in batch for item in outcome.delivery_ids]
        if delivery_ids:
            await queue_deliveries(ctx.redis, ctx.keys, delivery_ids)
        ended += batch
        # A full batch in which nothing changed would be locked again the same way.
        if len(locked) < BATCH_SIZE or not batch:
            return ended


async def fail_unreported_tasks(ctx: DispatcherContext) -> int:
    """End `failed` (`no_report`) every task acknowledged and unreported for
    TASK_REPORT_TIMEOUT_S; return how many."""
    settings = ctx.settings

    async def lock(session: AsyncSession) -> list[StalledTask]:
        return await repository.lock_unreported(
            session, report_timeout_s=settings.TASK_REPORT_TIMEOUT_S, limit=BATCH_SIZE
        )

    async def end(session: AsyncSession, task: StalledTask) -> AttemptEnd | None:
        message = await message_attempts.lock_message(session, task.message_id)
        if message is None:
            return None
        return await message_attempts.fail_attempt(
            session,
            settings,
            message,
            ERROR_NO_REPORT,
            retryable=False,
            attempt_status=AttemptStatus.NO_REPORT,
        )

    ended = await _end_in_batches(ctx, lock, end)
    for task, _ in ended:
        log.info(
            "message failed: no report from the device",
            message_id=str(task.message_id),
            device_id=str(task.device_id),
            attempt=task.attempt,
        )
    return len(ended)


async def expire_messages(ctx: DispatcherContext) -> int:
    """End `expired` every pending or assigned message past its `expires_at`; return how
    many."""
    settings = ctx.settings

    async def lock(session: AsyncSession) -> list[StalledTask]:
        return await repository.lock_expired(session, limit=BATCH_SIZE)

    async def end(session: AsyncSession, task: StalledTask) -> AttemptEnd | None:
        message = await message_attempts.lock_message(session, task.message_id)
        if message is None:
            return None
        return await message_attempts.expire_message(session, settings, message)

    ended = await _end_in_batches(ctx, lock, end)
    for task, _ in ended:
        log.info(
            "message expired",
            message_id=str(task.message_id),
            device_id=str(task.device_id),
        )
    return len(ended)


async def _end_deleted_device_task(
    session: AsyncSession, settings: Settings, task: StalledTask
) -> AttemptEnd | None:
    message = await message_attempts.lock_message(session, task.message_id)
    if message is None or message.device_id is not None:
        return None

    if message.status is MessageStatus.SENDING:
        # The phone claimed the SMS and may have sent it, but it can never report now.
        return await message_attempts.fail_attempt(
            session,
            settings,
            message,
            ERROR_NO_REPORT,
            retryable=False,
            attempt_status=AttemptStatus.NO_REPORT,
        )
    if message.status is not MessageStatus.ASSIGNED:
        return None

    if message.requested_device_id is not None:
        await message_attempts.record_attempt_status(
            session, message, AttemptStatus.FAILED, error=REQUESTED_DEVICE_DELETED
        )
        # No phone acknowledged the task, so nothing went out.
        delivery_ids = await message_attempts.end_failed(
            session, settings, message, REQUESTED_DEVICE_DELETED, refund=True
        )
        return AttemptEnd(MessageStatus.FAILED, None, delivery_ids)

    await message_attempts.record_attempt_status(
        session, message, AttemptStatus.MOVED, error=ERROR_DEVICE_DELETED
    )
    if not await repository.release_to_pending(session, message.id):
        return None
    return AttemptEnd(MessageStatus.PENDING, None, [])


async def end_tasks_of_deleted_devices(ctx: DispatcherContext) -> int:
    """End the attempt of every `assigned` or `sending` message whose device was
    deleted; return how many ended.

    - `sending`: the message ends `failed` with `no_report` and keeps its quota charge,
      because the SMS may have gone out and no report can arrive any more.
    - `assigned` to a device that the sender named: the message ends `failed` with
      REQUESTED_DEVICE_DELETED, and its charge is given back.
    - `assigned` otherwise: the attempt ends `moved`, and the message goes to another
      online device of its user, or waits `pending` for one.
    """
    settings = ctx.settings

    async def lock(session: AsyncSession) -> list[StalledTask]:
        return await repository.lock_deleted_device_tasks(session, limit=BATCH_SIZE)

    async def end(session: AsyncSession, task: StalledTask) -> AttemptEnd | None:
        return await _end_deleted_device_task(session, settings, task)

    ended = await _end_in_batches(ctx, lock, end)
    if not ended:
        return 0

    released = [
        task for task, outcome in ended if outcome.status is MessageStatus.PENDING
    ]
    plan = await assign_messages(ctx, [task.message_id for task in released])
    targets = {item.message.id: str(item.device_id) for item in plan.assignments}
    for task, outcome in ended:
        log.info(
            "task of a deleted device ended",
            message_id=str(task.message_id),
            attempt=task.attempt,
            status=outcome.status.value,
            to_device_id=targets.get(task.message_id),
        )
    return len(ended)


async def move_unacknowledged_tasks(
    ctx: DispatcherContext, user_id: uuid.UUID | None = None
) -> int:
    """Move every task unacknowledged for TASK_ACK_TIMEOUT_S on a device that is gone
    (offline or silent) to another online device of its user, and every task
    unacknowledged for STUCK_DEVICE_FACTOR times as long whatever its device. Only tasks
    of `user_id` move, when given. Returns how many moved.

    A message whose sender asked for its device never moves: it waits for that device.
    """
    settings = ctx.settings
    silent_after_s = max(
        settings.TASK_ACK_TIMEOUT_S,
        SILENT_PING_INTERVALS * settings.WEBSOCKET_PING_INTERVAL,
    )

    async def lock(session: AsyncSession) -> list[StalledTask]:
        return await repository.lock_unacknowledged(
            session,
            ack_timeout_s=settings.TASK_ACK_TIMEOUT_S,
            silent_after_s=silent_after_s,
            stuck_after_s=STUCK_DEVICE_FACTOR * settings.TASK_ACK_TIMEOUT_S,
            user_id=user_id,
            limit=BATCH_SIZE,
        )

    async def end(session: AsyncSession, task: StalledTask) -> AttemptEnd | None:
        message = await message_attempts.lock_message(session, task.message_id)
        if message is None:
            return None
        await message_attempts.record_attempt_status(
            session, message, AttemptStatus.MOVED, error=ERROR_NO_ACK
        )
        if not await repository.release_to_pending(session, message.id):
            return None
        return AttemptEnd(MessageStatus.PENDING, None, [])

    ended = await _end_in_batches(ctx, lock, end)
    if not ended:
        return 0

    # The failed-or-moved devices are avoided by the assignment, so each message goes to
    # another online device of its user.
    plan = await assign_messages(ctx, [task.message_id for task, _ in ended])
    # A message missing here was assigned by another job in between, or waits for a
    # device; either way its assignment is logged where it happens.
    targets = {item.message.id: str(item.device_id) for item in plan.assignments}
    for task, _ in ended:
        log.info(
            "unacknowledged task moved",
            message_id=str(task.message_id),
            from_device_id=str(task.device_id),
            to_device_id=targets.get(task.message_id),
            attempt=task.attempt,
        )
    return len(ended)
