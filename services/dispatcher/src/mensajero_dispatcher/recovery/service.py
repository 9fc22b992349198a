"""The recovery sweep: every message that is not final and has not changed for
RECOVERY_STALE_AFTER_S is put back in flight from Postgres.

Postgres contains every message and Redis only carries work. So this sweep finds what
Redis lost (a restart without persistence, a flush), what a dispatcher killed between
its commit and its push left undone, and what a device-hub killed with tasks in hand
dropped:

- a `pending` message is assigned again (it waits if no device can take it);
- an `assigned` or `sending` message gets its task pushed again when its device stream
  lacks it, and the device's hub is woken to read the stream.

The sweep makes passes over the stale messages, oldest change first. A run handles at
most MAX_BATCHES_PER_RUN batches, which bounds its cost however many messages wait, and
the next run goes on where it stopped. A new pass starts once the previous one has
reached the end and RECOVERY_STALE_AFTER_S has passed since it started, so each stale
message is handled about once per RECOVERY_STALE_AFTER_S. The position is kept in Redis
rather than written to the messages, so `updated_at` changes only when a message does.
Losing it (with the rest of Redis) only starts a new pass.
"""

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog

from mensajero_common import jsonutil, queues
from mensajero_common.keys import CHANNEL_WAKE
from mensajero_common.models import MessageStatus
from mensajero_dispatcher.context import DispatcherContext
from mensajero_dispatcher.messages.service import assign_messages, push_tasks_again
from mensajero_dispatcher.recovery import repository
from mensajero_dispatcher.recovery.repository import Cursor, StaleMessage

log = structlog.get_logger(__name__)

BATCH_SIZE = 100
MAX_BATCHES_PER_RUN = 20
# The progress key outlives many runs and expires only when the sweep stops running.
# The next pass then starts from the oldest message.
PROGRESS_TTL_FACTOR = 10
# A new pass may start a little before RECOVERY_STALE_AFTER_S has passed, so that runs
# that come slightly early (timer drift, another replica) do not skip a whole interval.
PASS_SPACING_FACTOR = 0.9


@dataclass(frozen=True)
class SweepProgress:
    """The recovery sweep's current pass: when it started (Unix time, seconds) and the
    last message it handled, or None once it reached the end."""

    started_at_s: float
    after: Cursor | None


async def _load_progress(ctx: DispatcherContext) -> SweepProgress | None:
    raw = await ctx.redis.get(ctx.keys.recovery_sweep_progress)
    if raw is None:
        return None
    try:
        data = jsonutil.loads(raw)
        after = data["after"]
        cursor = (
            (datetime.fromisoformat(after[0]), uuid.UUID(after[1]))
            if after is not None
            else None
        )
        return SweepProgress(float(data["started_at_s"]), cursor)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        log.warning(
            "invalid recovery sweep progress; starting a new pass", error=repr(error)
        )
        return None


async def _save_progress(ctx: DispatcherContext, progress: SweepProgress) -> None:
    after = progress.after
    data = {
        "started_at_s": progress.started_at_s,
        "after": [after[0].isoformat(), str(after[1])] if after is not None else None,
    }
    ttl_s = PROGRESS_TTL_FACTOR * ctx.settings.RECOVERY_STALE_AFTER_S
    await ctx.redis.set(
        ctx.keys.recovery_sweep_progress,
        jsonutil.dumps(data),
        px=max(1, int(ttl_s * 1000)),
    )


async def _resume_or_start_pass(ctx: DispatcherContext) -> SweepProgress | None:
    """Return the pass this run goes on with, or None while the last finished pass
    started less than about RECOVERY_STALE_AFTER_S ago."""
    now_s = time.time()
    progress = await _load_progress(ctx)
    if progress is None:
        return SweepProgress(now_s, None)
    if progress.after is not None:
        return progress
    spacing_s = PASS_SPACING_FACTOR * ctx.settings.RECOVERY_STALE_AFTER_S
    if now_s - progress.started_at_s < spacing_s:
        return None
    return SweepProgress(now_s, None)


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
    """Put back in flight the next open messages unchanged for RECOVERY_STALE_AFTER_S
    in the current pass, up to MAX_BATCHES_PER_RUN batches; return how many messages
    were handled."""
    progress = await _resume_or_start_pass(ctx)
    if progress is None:
        return 0

    handled = 0
    assigned = 0
    pushed = 0
    cursor = progress.after
    finished = False
    for _ in range(MAX_BATCHES_PER_RUN):
        async with ctx.session_factory() as session:
            batch = await repository.list_stale(
                session,
                stale_after_s=ctx.settings.RECOVERY_STALE_AFTER_S,
                after=cursor,
                limit=BATCH_SIZE,
            )
        if not batch:
            finished = True
            break

        pending = [m.id for m in batch if m.status is MessageStatus.PENDING]
        in_flight = [m for m in batch if m.status is not MessageStatus.PENDING]
        if pending:
            plan = await assign_messages(ctx, pending)
            assigned += len(plan.assignments)
        if in_flight:
            pushed += await _recover_in_flight(ctx, in_flight)

        handled += len(batch)
        cursor = batch[-1].cursor
        if len(batch) < BATCH_SIZE:
            finished = True
            break

    await _save_progress(
        ctx, SweepProgress(progress.started_at_s, None if finished else cursor)
    )
    if handled:
        log.info(
            "stale messages put back in flight",
            count=handled,
            assigned=assigned,
            tasks_pushed=pushed,
        )
    return handled
