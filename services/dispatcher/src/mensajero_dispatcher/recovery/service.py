"""The recovery sweep: every message that is not final and has not changed for
RECOVERY_STALE_AFTER_S is put back in flight from Postgres.

Postgres contains every message and Redis only carries work. So this sweep finds what
Redis lost (a restart without persistence, a flush), what a dispatcher killed between
its commit and its push left undone, and what a device-hub killed with tasks in hand
dropped:

- a `pending` message is assigned again (it waits if no device can take it);
- an `assigned` or `sending` message gets its task pushed again when its device stream
  lacks it, and the device's hub is woken to read the stream.

Then the sweep marks each message it handled as changed now, so the next runs move on
to others and each stale message is handled about once per RECOVERY_STALE_AFTER_S. A run
handles at most MAX_BATCHES_PER_RUN batches, which bounds its cost however many messages
wait.
"""

import uuid
from collections.abc import Sequence

import structlog

from mensajero_common import queues
from mensajero_common.db import session_scope
from mensajero_common.keys import CHANNEL_WAKE
from mensajero_common.models import MessageStatus
from mensajero_dispatcher.context import DispatcherContext
from mensajero_dispatcher.messages.service import assign_messages, push_tasks_again
from mensajero_dispatcher.recovery import repository
from mensajero_dispatcher.recovery.repository import Cursor, StaleMessage

log = structlog.get_logger(__name__)

BATCH_SIZE = 100
MAX_BATCHES_PER_RUN = 20


async def _missing_from_streams(
    ctx: DispatcherContext, messages: Sequence[StaleMessage]
) -> list[uuid.UUID]:
    device_ids = sorted({m.device_id for m in messages if m.device_id is not None})
    # One XRANGE per device, in one round trip. A device stream contains only the tasks
    # its phone has not finished.
    async with ctx.redis.pipeline(transaction=False) as pipe:
        for device_id in device_ids:
            pipe.xrange(ctx.keys.device_tasks_stream(device_id))
        streams = await pipe.execute()
    queued: set[bytes] = set()
    for entries in streams:
        queued.update(fields[b"message_id"] for _, fields in entries)
    return [
        message.id
        for message in messages
        if message.device_id is not None and str(message.id).encode() not in queued
    ]


async def _recover_in_flight(
    ctx: DispatcherContext, messages: Sequence[StaleMessage]
) -> int:
    missing = await _missing_from_streams(ctx, messages)
    pushed = await push_tasks_again(ctx, missing) if missing else 0
    # A wake makes the hub holding the device read its stream again, in case the wake of
    # the original push was lost.
    for device_id in {m.device_id for m in messages if m.device_id is not None}:
        await queues.publish_device_control(
            ctx.redis, ctx.keys, device_id, CHANNEL_WAKE
        )
    return pushed


async def recover_stale_messages(ctx: DispatcherContext) -> int:
    """Put back in flight every open message unchanged for RECOVERY_STALE_AFTER_S, up to
    MAX_BATCHES_PER_RUN batches; return how many messages were handled."""
    handled = 0
    assigned = 0
    pushed = 0
    cursor: Cursor | None = None
    for _ in range(MAX_BATCHES_PER_RUN):
        async with ctx.session_factory() as session:
            batch = await repository.list_stale(
                session,
                stale_after_s=ctx.settings.RECOVERY_STALE_AFTER_S,
                after=cursor,
                limit=BATCH_SIZE,
            )
        if not batch:
            break

        pending = [m.id for m in batch if m.status is MessageStatus.PENDING]
        in_flight = [m for m in batch if m.status is not MessageStatus.PENDING]
        if pending:
            plan = await assign_messages(ctx, pending)
            assigned += len(plan.assignments)
        if in_flight:
            pushed += await _recover_in_flight(ctx, in_flight)
        async with session_scope(ctx.session_factory) as session:
            await repository.touch(session, batch)

        handled += len(batch)
        cursor = batch[-1].cursor
        if len(batch) < BATCH_SIZE:
            break

    if handled:
        log.info(
            "stale messages put back in flight",
            count=handled,
            assigned=assigned,
            tasks_pushed=pushed,
        )
    return handled
