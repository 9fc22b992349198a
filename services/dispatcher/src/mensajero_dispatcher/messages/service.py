"""Assigning pending messages to devices, and putting lost tasks back in device streams.

An assignment commits first and pushes the task after, so a crash in between leaves an
`assigned` message without a task. `repush_lost_tasks` finds such a message and pushes
its task again. Pushing twice is safe, because devices and the hub deduplicate tasks by
message id.
"""

import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import asyncpg
import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common import message_attempts, protocol, queues
from mensajero_common.db import driver_connection, session_scope
from mensajero_common.models import DeviceStatus, MessageStatus, SMSDevice
from mensajero_common.transient import is_transient
from mensajero_common.webhook_outbox import queue_deliveries, record_message_event
from mensajero_common.webhooks import EVENT_SMS_FAILED
from mensajero_dispatcher.context import DispatcherContext
from mensajero_dispatcher.messages import repository
from mensajero_dispatcher.messages.repository import Cursor
from mensajero_dispatcher.messages.schemas import (
    Assignment,
    AssignmentPlan,
    InFlightTask,
    OnlineDevice,
    PendingMessage,
    Rejection,
    RequestedDevice,
)
from mensajero_dispatcher.pace import service as pace

log = structlog.get_logger(__name__)

BATCH_SIZE = 100
# The sweep leaves younger pending messages to the stream consumer, which is normally
# assigning them at that very moment.
PENDING_GRACE_S = 5.0
# A task is pushed just after its assignment commits, so younger assignments may not
# have their stream entry yet and are left alone.
REPUSH_GRACE_S = 10.0
REQUESTED_DEVICE_DELETED = "requested_device_deleted"

LockBatch = Callable[[AsyncSession], Awaitable[list[PendingMessage]]]


@dataclass
class BatchOutcome:
    locked: list[PendingMessage] = field(default_factory=list)
    plan: AssignmentPlan = field(default_factory=AssignmentPlan)

    @property
    def last_cursor(self) -> Cursor | None:
        return self.locked[-1].cursor if self.locked else None


def plan_assignments(
    messages: Sequence[PendingMessage],
    online_devices: Iterable[OnlineDevice],
    requested_devices: dict[uuid.UUID, RequestedDevice],
    pace_left: dict[uuid.UUID, int] | None = None,
) -> AssignmentPlan:
    """Choose a device for each message, oldest first, without touching the database.

    A requested device gets its message even when offline, since the task waits in its
    stream. Otherwise the online device of the user with the fewest in-flight messages
    wins, counting the messages this plan has already given it, so one batch spreads.
    With `pace_left` (tasks each device may still be handed in this window; None means
    no pace), a device at 0 takes no more: its requested messages wait, and the others
    go to another online device of the user that has pace left, or wait.
    """

    def has_pace(device_id: uuid.UUID) -> bool:
        return pace_left is None or pace_left.get(device_id, 0) > 0

    loads: dict[uuid.UUID, int] = {}
    devices_by_user: dict[uuid.UUID, list[uuid.UUID]] = {}
    for device in online_devices:
        loads[device.id] = device.in_flight
        devices_by_user.setdefault(device.user_id, []).append(device.id)

    plan = AssignmentPlan()
    for message in messages:
        if message.requested_device_id is not None:
            requested = requested_devices.get(message.requested_device_id)
            if requested is None or requested.user_id != message.user_id:
                plan.rejections.append(Rejection(message, REQUESTED_DEVICE_DELETED))
                continue
            if not requested.is_active or not has_pace(requested.id):
                plan.waiting.append(message)
                continue
            device_id = requested.id
        else:
            candidates = [
                item
                for item in devices_by_user.get(message.user_id, [])
                if has_pace(item)
            ]
            if not candidates:
                plan.waiting.append(message)
                continue
            # A retry goes to a device that has not failed this message, if one is
            # online; otherwise any online device may try again.
            untried = [
                item for item in candidates if item not in message.avoid_device_ids
            ]
            device_id = min(
                untried or candidates, key=lambda item: (loads[item], str(item))
            )

        loads[device_id] = loads.get(device_id, 0) + 1
        if pace_left is not None:
            pace_left[device_id] = pace_left.get(device_id, 0) - 1
        plan.assignments.append(Assignment(message, device_id))
    return plan


def count_devices_needed(messages: Iterable[PendingMessage]) -> dict[uuid.UUID, int]:
    """Return, per user with messages that name no device, how many of its least-loaded
    online devices `plan_assignments` may choose from without changing its choices.

    For a user with n such messages, k counts the devices that the user's messages name
    or avoid. Before each choice at most n - 1 devices have taken a message from the
    plan, so among the n + k least-loaded devices one is still at its starting load and
    not avoided. It precedes, by load and then id, every device outside the n + k, so
    none of those is ever chosen. When the n + k include every online device of the
    user, the choice is among all of them anyway. This holds only without a pace limit,
    which can rule out any number of devices.
    """
    unnamed: dict[uuid.UUID, int] = {}
    named_or_avoided: dict[uuid.UUID, set[uuid.UUID]] = {}
    for message in messages:
        devices = named_or_avoided.setdefault(message.user_id, set())
        if message.requested_device_id is not None:
            devices.add(message.requested_device_id)
            continue
        unnamed[message.user_id] = unnamed.get(message.user_id, 0) + 1
        devices.update(message.avoid_device_ids)
    return {
        user_id: count + len(named_or_avoided[user_id])
        for user_id, count in unnamed.items()
    }


async def _plan(
    ctx: DispatcherContext,
    connection: asyncpg.Connection,
    messages: Sequence[PendingMessage],
) -> AssignmentPlan:
    requested_ids = {
        message.requested_device_id
        for message in messages
        if message.requested_device_id is not None
    }
    requested = (
        await repository.find_requested_devices(connection, requested_ids)
        if requested_ids
        else {}
    )
    # A user may have hundreds of devices online, so only those that can be chosen are
    # loaded for the first plan.
    least_loaded = await repository.find_least_loaded_devices(
        connection, count_devices_needed(messages)
    )
    # Reading the pace of every candidate costs a Redis call per device, so the plan
    # first assumes room everywhere, and the pace is read only when a device is full.
    plan = plan_assignments(messages, least_loaded, requested)
    denied = await pace.reserve(ctx, plan)
    if not denied:
        return plan

    # The pace may rule out any of the devices loaded so far, so the second plan weighs
    # every online device of the users.
    online = await repository.find_online_devices(
        connection, {message.user_id for message in messages}
    )
    candidates = {device.id for device in online} | {
        device.id for device in requested.values() if device.is_active
    }
    left = await pace.pace_left(ctx, candidates)
    planned: dict[uuid.UUID, int] = {}
    for assignment in plan.assignments:
        planned[assignment.device_id] = planned.get(assignment.device_id, 0) + 1
    loaded = [
        replace(device, in_flight=device.in_flight + planned.get(device.id, 0))
        for device in online
    ]
    replan = plan_assignments(
        [assignment.message for assignment in denied], loaded, requested, left
    )
    still_denied = await pace.reserve(ctx, replan)
    plan.assignments += replan.assignments
    plan.rejections += replan.rejections
    plan.waiting += replan.waiting
    plan.waiting += [assignment.message for assignment in still_denied]
    return plan


async def _reject(session: AsyncSession, rejection: Rejection) -> list[uuid.UUID]:
    """Fail a message that can never be sent, and record its `sms_failed` event."""
    message = rejection.message
    failed_at = await repository.mark_failed(session, message.id, rejection.error)
    if failed_at is None:
        return []
    # No phone ever had it, so nothing went out.
    await message_attempts.refund_quota(session, message.id, message.user_id)
    return await record_message_event(
        session,
        event=EVENT_SMS_FAILED,
        user_id=message.user_id,
        message_id=message.id,
        from_number=None,
        to_number=message.to_number,
        body=message.body,
        timestamp=failed_at,
        device_id=None,
        status=MessageStatus.FAILED.value,
        error=rejection.error,
        segments=message.segments,
    )


def _task_frame(message: PendingMessage | InFlightTask) -> dict[str, object]:
    return protocol.task_frame(
        message.id,
        message.to_number,
        message.body,
        segments=message.segments,
        encoding=message.encoding,
        created_at=message.created_at,
        attempt=message.task_attempt,
        expires_at=message.expires_at,
    )


async def _push_tasks(
    ctx: DispatcherContext,
    tasks: Sequence[tuple[uuid.UUID, PendingMessage | InFlightTask]],
) -> int:
    """Push (device id, message) tasks in one round trip; return how many were pushed.

    On a Redis failure none counts as pushed, although some may have been. The messages
    are committed as assigned already, so the repush sweep pushes the missing ones
    later. A task pushed twice is safe, because devices and the hub deduplicate tasks
    by message id.
    """
    if not tasks:
        return 0
    try:
        await queues.push_device_tasks(
            ctx.redis,
            ctx.keys,
            [
                (device_id, message.id, _task_frame(message))
                for device_id, message in tasks
            ],
        )
    except Exception as error:
        if not is_transient(error):
            raise
        log.warning(
            "task push failed; the repush sweep will retry",
            error=repr(error),
            unpushed=len(tasks),
        )
        return 0
    return len(tasks)


async def _assign_batch(ctx: DispatcherContext, lock: LockBatch) -> BatchOutcome:
    """Lock a batch with `lock`, assign it in one transaction, then push its tasks."""
    outcome = BatchOutcome()
    delivery_ids: list[uuid.UUID] = []
    async with session_scope(ctx.session_factory) as session:
        outcome.locked = await lock(session)
        if not outcome.locked:
            return outcome

        # The plan and the assignment run on the driver, inside the session's transaction.
        connection = await driver_connection(session)
        outcome.plan = await _plan(ctx, connection, outcome.locked)
        await repository.mark_assigned(connection, outcome.plan.assignments)
        for rejection in outcome.plan.rejections:
            delivery_ids += await _reject(session, rejection)

    await _push_committed_plan(ctx, outcome.plan, delivery_ids)
    return outcome


async def _assign_batch_unlocked(
    ctx: DispatcherContext,
    message_ids: Sequence[uuid.UUID],
    carried: Sequence[PendingMessage] = (),
) -> BatchOutcome:
    """Assign those of `message_ids` that are pending, and the `carried` messages, like
    `_assign_batch`, but with each statement committing on its own, then push their
    tasks.

    This saves the BEGIN and COMMIT round trips. The messages are read without a lock,
    and the assignment statement moves only those still as they were read (see
    repository.mark_assigned). A message that changed in between, for example because
    another dispatcher assigned it, is left alone. The pace reserved for it stays
    taken for the window, as after a failed commit. The carried messages are not read
    at all: their stream entries hold them as they were committed, and the assignment
    statement leaves those that are no longer pending and due in the same way.
    """
    outcome = BatchOutcome()
    async with ctx.session_factory() as session:
        # On the driver, without the ORM, which cost more CPU than the round trips.
        connection = await driver_connection(session, transaction=False)
        read = (
            await repository.find_pending_by_ids(connection, message_ids)
            if message_ids
            else []
        )
        outcome.locked = _oldest_first(carried, read)
        if not outcome.locked:
            return outcome

        outcome.plan = await _plan(ctx, connection, outcome.locked)
        assigned = await repository.mark_assigned(connection, outcome.plan.assignments)
    outcome.plan.assignments = [
        item for item in outcome.plan.assignments if item.message.id in assigned
    ]

    delivery_ids: list[uuid.UUID] = []
    if outcome.plan.rejections:
        # Failing a message, refunding its quota and recording its event go together.
        async with session_scope(ctx.session_factory) as session:
            for rejection in outcome.plan.rejections:
                delivery_ids += await _reject(session, rejection)

    await _push_committed_plan(ctx, outcome.plan, delivery_ids)
    return outcome


def _oldest_first(
    carried: Sequence[PendingMessage], read: Sequence[PendingMessage]
) -> list[PendingMessage]:
    """Merge the carried and the read messages, once each and oldest first; a message
    that was read too is taken as read."""
    by_id = {message.id: message for message in carried}
    by_id.update((message.id, message) for message in read)
    return sorted(by_id.values(), key=lambda message: message.cursor)


async def _push_committed_plan(
    ctx: DispatcherContext, plan: AssignmentPlan, delivery_ids: list[uuid.UUID]
) -> None:
    """Push the tasks of a committed plan, log its outcome and queue its webhooks."""
    # Pushed before the batch's log lines are written, so the phones do not wait for them.
    await _push_tasks(
        ctx, [(item.device_id, item.message) for item in plan.assignments]
    )
    for rejection in plan.rejections:
        log.info(
            "message failed",
            message_id=str(rejection.message.id),
            user_id=str(rejection.message.user_id),
            error=rejection.error,
        )
    for assignment in plan.assignments:
        log.info(
            "message assigned",
            message_id=str(assignment.message.id),
            device_id=str(assignment.device_id),
            user_id=str(assignment.message.user_id),
        )
    for message in plan.waiting:
        log.debug(
            "message waits for a device or for a device's pace",
            message_id=str(message.id),
            user_id=str(message.user_id),
        )

    if delivery_ids:
        await queue_deliveries(ctx.redis, ctx.keys, delivery_ids)


async def _assign_batch_isolated(
    ctx: DispatcherContext, lock: LockBatch
) -> BatchOutcome:
    """Assign a batch like `_assign_batch`, but when it fails from the data of one
    message, assign its messages one by one so that one bad message stops only itself.

    A transient failure propagates, since every message would fail the same way.
    """
    try:
        return await _assign_batch(ctx, lock)
    except Exception as error:
        if is_transient(error):
            raise
        log.exception("batch assignment failed; assigning its messages one by one")
    return await _assign_one_by_one(ctx, lock)


async def _assign_one_by_one(ctx: DispatcherContext, lock: LockBatch) -> BatchOutcome:
    """Assign each message that `lock` finds in a batch of its own, and log each failure."""
    async with ctx.session_factory() as session, session.begin():
        locked = await lock(session)
    outcome = BatchOutcome(locked=locked)
    for message in locked:
        single = partial(repository.lock_pending_by_ids, message_ids=[message.id])
        try:
            plan = (await _assign_batch(ctx, single)).plan
        except Exception as error:
            if is_transient(error):
                raise
            log.exception("message assignment failed", message_id=str(message.id))
            continue
        outcome.plan.assignments += plan.assignments
        outcome.plan.rejections += plan.rejections
        outcome.plan.waiting += plan.waiting
    return outcome


async def assign_messages(
    ctx: DispatcherContext,
    message_ids: Sequence[uuid.UUID],
    carried: Sequence[PendingMessage] = (),
) -> AssignmentPlan:
    """Assign those of `message_ids` that are still pending, and the `carried` messages
    that are, and skip the others.

    `carried` are new messages as their stream entries hold them, assigned without
    being read first. The same id given twice is assigned once, because the second
    time it is not pending.
    """
    if not message_ids and not carried:
        return AssignmentPlan()
    try:
        return (await _assign_batch_unlocked(ctx, message_ids, carried)).plan
    except Exception as error:
        if is_transient(error):
            raise
        log.exception("batch assignment failed; assigning its messages one by one")
    every_id = [*message_ids, *(message.id for message in carried)]
    lock = partial(repository.lock_pending_by_ids, message_ids=every_id)
    return (await _assign_one_by_one(ctx, lock)).plan


async def assign_pending_for_device(
    ctx: DispatcherContext, device_id: uuid.UUID
) -> int:
    """Assign the pending messages that may go to a device that just came online.

    Pages through the user's pending messages oldest first, a batch per transaction,
    and lets the usual choice spread them over every online device of the user.
    Returns how many messages were assigned.
    """
    async with ctx.session_factory() as session:
        device = await session.get(SMSDevice, device_id)
    if device is None or not device.is_active or device.status != DeviceStatus.ONLINE:
        return 0

    assigned = 0
    cursor: Cursor | None = None
    while True:
        lock = partial(
            repository.lock_pending_for_device,
            user_id=device.user_id,
            device_id=device.id,
            after=cursor,
            limit=BATCH_SIZE,
        )
        outcome = await _assign_batch_isolated(ctx, lock)
        assigned += len(outcome.plan.assignments)
        if len(outcome.locked) < BATCH_SIZE:
            return assigned
        cursor = outcome.last_cursor


async def assign_pending_messages(
    ctx: DispatcherContext, *, older_than_s: float = PENDING_GRACE_S
) -> int:
    """Assign every pending message older than `older_than_s` that a device can take now.

    This catches messages whose stream entry never arrived (Redis lost it, or the API
    stopped between its commit and the signal). Returns how many were assigned.
    """
    assigned = 0
    cursor: Cursor | None = None
    while True:
        lock = partial(
            repository.lock_assignable_pending,
            older_than_s=older_than_s,
            after=cursor,
            limit=BATCH_SIZE,
        )
        outcome = await _assign_batch_isolated(ctx, lock)
        assigned += len(outcome.plan.assignments)
        if len(outcome.locked) < BATCH_SIZE:
            return assigned
        cursor = outcome.last_cursor


async def assign_due_retries(ctx: DispatcherContext) -> int:
    """Assign every message whose retry delay has passed; return how many were assigned.

    Runs more often than the pending sweep, so a retry waits about MESSAGE_RETRY_DELAY_S
    and not a whole sweep interval.
    """
    assigned = 0
    cursor: Cursor | None = None
    while True:
        lock = partial(repository.lock_due_retries, after=cursor, limit=BATCH_SIZE)
        outcome = await _assign_batch_isolated(ctx, lock)
        assigned += len(outcome.plan.assignments)
        if len(outcome.locked) < BATCH_SIZE:
            return assigned
        cursor = outcome.last_cursor


async def _find_lost_tasks(
    ctx: DispatcherContext, device_ids: Sequence[uuid.UUID], *, older_than_s: float
) -> list[uuid.UUID]:
    """Return in-flight messages of these devices that have no entry in their stream."""
    async with ctx.session_factory() as session:
        in_flight = await repository.list_in_flight_ids(
            session, device_ids, assigned_before_s=older_than_s
        )
    if not in_flight:
        return []

    # One XRANGE per device, in one round trip. A device stream contains only the tasks
    # its phone has not finished, so each read stays short.
    async with ctx.redis.pipeline(transaction=False) as pipe:
        for device_id in device_ids:
            pipe.xrange(ctx.keys.device_tasks_stream(device_id))
        streams = await pipe.execute()
    queued: set[str] = set()
    for entries in streams:
        queued.update(fields[b"message_id"].decode() for _, fields in entries)

    return [message_id for message_id, _ in in_flight if str(message_id) not in queued]


async def push_tasks_again(
    ctx: DispatcherContext, message_ids: Sequence[uuid.UUID]
) -> int:
    """Push the task of each of these messages that is still in flight to its device;
    return how many were pushed."""
    async with ctx.session_factory() as session:
        tasks = await repository.load_in_flight_tasks(session, message_ids)
    for task in tasks:
        log.info(
            "task pushed again",
            message_id=str(task.id),
            device_id=str(task.device_id),
            attempt=task.task_attempt,
        )
    return await _push_tasks(ctx, [(task.device_id, task) for task in tasks])


async def repush_lost_tasks(
    ctx: DispatcherContext, *, older_than_s: float = REPUSH_GRACE_S
) -> int:
    """Push again the task of every in-flight message missing from its device stream.

    Covers `assigned` messages and `sending` ones too: a phone that restarts while sending
    gets the task again on reconnect and reports on it instead of sending it twice.
    Returns how many tasks were pushed.
    """
    pushed = 0
    after: uuid.UUID | None = None
    while True:
        async with ctx.session_factory() as session:
            device_ids = await repository.list_devices_with_tasks(
                session, assigned_before_s=older_than_s, after=after, limit=BATCH_SIZE
            )
        if not device_ids:
            return pushed

        lost_ids = await _find_lost_tasks(ctx, device_ids, older_than_s=older_than_s)
        if lost_ids:
            # Reloaded after the stream reads, so a message that finished meanwhile (and
            # left its stream) is not pushed back.
            pushed += await push_tasks_again(ctx, lost_ids)

        if len(device_ids) < BATCH_SIZE:
            return pushed
        after = device_ids[-1]
