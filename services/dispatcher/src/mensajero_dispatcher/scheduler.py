"""Periodic jobs of the dispatcher, run by asyncio tasks in the consumer's process.

Plain asyncio loops rather than arq cron jobs: the intervals are settings in seconds
(arq cron only fires at calendar times), and the jobs need no queue. Every replica runs
the loops, and a Redis lock per job (SET NX with the interval as TTL) lets one replica
run each job per interval. The jobs are safe to overlap anyway, because they lock rows
with SKIP LOCKED and pushing a task twice is harmless.
"""

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from mensajero_common.transient import is_transient
from mensajero_dispatcher.attempts.service import (
    end_tasks_of_deleted_devices,
    expire_messages,
    fail_unreported_tasks,
    move_unacknowledged_tasks,
)
from mensajero_dispatcher.context import DispatcherContext
from mensajero_dispatcher.devices.service import cleanup_offline_devices
from mensajero_dispatcher.lifecycle import sleep_unless_stopped
from mensajero_dispatcher.messages.service import (
    assign_due_retries,
    assign_pending_messages,
    repush_lost_tasks,
)
from mensajero_dispatcher.quotas.service import reset_monthly_quotas
from mensajero_dispatcher.recovery.service import recover_stale_messages

log = structlog.get_logger(__name__)

# Maximum interval of the offline cleanup. A heartbeat timeout under twice this value
# makes the cleanup run every half timeout instead.
OFFLINE_CLEANUP_MAX_INTERVAL_S = 60.0
# Bounds of the recovery sweep's interval, which is half of RECOVERY_STALE_AFTER_S.
RECOVERY_MIN_INTERVAL_S = 1.0
RECOVERY_MAX_INTERVAL_S = 60.0


@dataclass(frozen=True)
class PeriodicJob:
    # `entity.verb`, also the name of its lock and in its logs.
    name: str
    interval_s: float
    run: Callable[[DispatcherContext], Awaitable[int]]


def default_jobs(ctx: DispatcherContext) -> list[PeriodicJob]:
    settings = ctx.settings
    return [
        PeriodicJob(
            "message.assign_pending",
            settings.DISPATCHER_SWEEP_INTERVAL,
            assign_pending_messages,
        ),
        PeriodicJob(
            "message.repush_assigned",
            settings.DISPATCHER_SWEEP_INTERVAL,
            repush_lost_tasks,
        ),
        PeriodicJob(
            "device.cleanup_offline",
            min(
                OFFLINE_CLEANUP_MAX_INTERVAL_S,
                settings.WEBSOCKET_HEARTBEAT_TIMEOUT / 2,
            ),
            cleanup_offline_devices,
        ),
        PeriodicJob(
            "message.retry_due", settings.MESSAGE_CHECK_INTERVAL_S, assign_due_retries
        ),
        PeriodicJob(
            "message.move_unacknowledged",
            settings.MESSAGE_CHECK_INTERVAL_S,
            move_unacknowledged_tasks,
        ),
        PeriodicJob(
            "message.fail_unreported",
            settings.MESSAGE_CHECK_INTERVAL_S,
            fail_unreported_tasks,
        ),
        PeriodicJob(
            "message.expire", settings.MESSAGE_CHECK_INTERVAL_S, expire_messages
        ),
        PeriodicJob(
            "message.end_deleted_device_tasks",
            settings.MESSAGE_CHECK_INTERVAL_S,
            end_tasks_of_deleted_devices,
        ),
        PeriodicJob(
            "message.recover_stale",
            min(
                RECOVERY_MAX_INTERVAL_S,
                max(RECOVERY_MIN_INTERVAL_S, settings.RECOVERY_STALE_AFTER_S / 2),
            ),
            recover_stale_messages,
        ),
        PeriodicJob(
            "quota.reset_monthly",
            settings.QUOTA_RESET_CHECK_INTERVAL_S,
            reset_monthly_quotas,
        ),
    ]


async def _acquire_lock(ctx: DispatcherContext, job: PeriodicJob) -> bool:
    # A little under the interval, so the replica that ran the job last can take the
    # lock again on time despite timer drift.
    ttl_ms = max(1, int(job.interval_s * 900))
    return bool(
        await ctx.redis.set(
            ctx.keys.periodic_job_lock(job.name), b"1", nx=True, px=ttl_ms
        )
    )


async def run_job_once(ctx: DispatcherContext, job: PeriodicJob) -> None:
    """Run one job if this replica gets its lock, and log a failure instead of raising it."""
    try:
        if not await _acquire_lock(ctx, job):
            return
        count = await job.run(ctx)
    except Exception as error:
        if is_transient(error):
            log.warning("periodic job failed", job=job.name, error=repr(error))
        else:
            log.exception("periodic job failed", job=job.name)
        return
    log.debug("periodic job done", job=job.name, count=count)


async def _run_periodically(
    ctx: DispatcherContext, job: PeriodicJob, stop: asyncio.Event
) -> None:
    # The first run comes at start, to pick up what waited while no dispatcher ran.
    while not stop.is_set():
        await run_job_once(ctx, job)
        await sleep_unless_stopped(stop, job.interval_s)


async def run_periodic_jobs(
    ctx: DispatcherContext, jobs: Sequence[PeriodicJob], stop: asyncio.Event
) -> None:
    """Run each job every `interval_s` until `stop` is set, letting a running job finish."""
    async with asyncio.TaskGroup() as group:
        for job in jobs:
            group.create_task(_run_periodically(ctx, job, stop), name=job.name)
