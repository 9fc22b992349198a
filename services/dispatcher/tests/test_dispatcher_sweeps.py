import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from mensajero_common import queues
from mensajero_common.models import DeviceStatus, MessageStatus
from mensajero_common.testing import scaled
from mensajero_dispatcher.devices.service import cleanup_offline_devices
from mensajero_dispatcher.messages.service import (
    assign_messages,
    assign_pending_messages,
    repush_lost_tasks,
)
from mensajero_dispatcher.scheduler import PeriodicJob, run_job_once, run_periodic_jobs


async def _queued_ids(ctx, device_id):
    tasks = await queues.read_device_tasks(ctx.redis, ctx.keys, device_id, count=500)
    return [message_id for _, message_id, _ in tasks]


async def test_repush_restores_deleted_device_stream(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    message = await factory.message(user)
    await assign_messages(ctx, [message.id])
    await ctx.redis.delete(ctx.keys.device_tasks_stream(device.id))

    pushed = await repush_lost_tasks(ctx, older_than_s=0)

    assert pushed == 1
    assert await _queued_ids(ctx, device.id) == [message.id]
    stored = await factory.reload(message)
    assert stored.status == MessageStatus.ASSIGNED
    assert stored.attempts == 1


async def test_repush_skips_tasks_still_queued(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    message = await factory.message(user)
    await assign_messages(ctx, [message.id])

    pushed = await repush_lost_tasks(ctx, older_than_s=0)

    assert pushed == 0
    assert await _queued_ids(ctx, device.id) == [message.id]


async def test_repush_covers_sending_but_not_finished(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    sending = await factory.message(
        user, status=MessageStatus.SENDING, device=device, age_s=60
    )
    await factory.message(user, status=MessageStatus.SENT, device=device, age_s=60)
    await factory.message(user, status=MessageStatus.DELIVERED, device=device, age_s=60)

    pushed = await repush_lost_tasks(ctx)

    assert pushed == 1
    assert await _queued_ids(ctx, device.id) == [sending.id]


async def test_repush_leaves_fresh_assignments_alone(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    await factory.message(user, status=MessageStatus.ASSIGNED, device=device)

    pushed = await repush_lost_tasks(ctx)

    assert pushed == 0
    assert await _queued_ids(ctx, device.id) == []


async def test_repush_pages_through_many_devices(ctx, factory):
    user = await factory.user()
    devices = [
        await factory.device(user, status=DeviceStatus.OFFLINE) for _ in range(105)
    ]
    for device in devices:
        await factory.message(
            user, status=MessageStatus.ASSIGNED, device=device, age_s=60
        )

    pushed = await repush_lost_tasks(ctx)

    assert pushed == 105
    assert [len(await _queued_ids(ctx, device.id)) for device in devices] == [1] * 105


async def test_pending_sweep_assigns_old_pending(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    old = await factory.message(user, age_s=60)
    fresh = await factory.message(user)

    assigned = await assign_pending_messages(ctx)

    assert assigned == 1
    assert (await factory.reload(old)).status == MessageStatus.ASSIGNED
    assert (await factory.reload(fresh)).status == MessageStatus.PENDING
    assert await _queued_ids(ctx, device.id) == [old.id]


async def test_pending_sweep_skips_waiting_messages(ctx, factory):
    user = await factory.user()
    await factory.device(user, status=DeviceStatus.OFFLINE)
    waiting = await factory.message(user, age_s=60)
    disabled = await factory.device(user, is_active=False)
    for_disabled = await factory.message(user, requested_device=disabled, age_s=60)
    offline = await factory.device(user, status=DeviceStatus.OFFLINE)
    for_offline = await factory.message(user, requested_device=offline, age_s=60)

    assigned = await assign_pending_messages(ctx)

    assert assigned == 1
    assert (await factory.reload(waiting)).status == MessageStatus.PENDING
    assert (await factory.reload(for_disabled)).status == MessageStatus.PENDING
    assert (await factory.reload(for_offline)).status == MessageStatus.ASSIGNED


async def test_pending_sweep_pages_past_batch_size(ctx, factory):
    user = await factory.user()
    first = await factory.device(user)
    second = await factory.device(user)
    messages = [await factory.message(user, age_s=600 - i) for i in range(150)]

    assigned = await assign_pending_messages(ctx)

    assert assigned == 150
    assert len(await _queued_ids(ctx, first.id)) == 75
    assert len(await _queued_ids(ctx, second.id)) == 75
    assert (await factory.reload(messages[-1])).status == MessageStatus.ASSIGNED


async def test_cleanup_marks_silent_devices_offline(ctx, factory):
    user = await factory.user()
    timeout_s = ctx.settings.WEBSOCKET_HEARTBEAT_TIMEOUT
    now = datetime.now(UTC)
    silent = await factory.device(
        user, last_heartbeat=now - timedelta(seconds=timeout_s + 5)
    )
    alive = await factory.device(
        user, last_heartbeat=now - timedelta(seconds=timeout_s - 30)
    )
    registered = await factory.device(
        user,
        status=DeviceStatus.REGISTERED,
        last_heartbeat=now - timedelta(days=3),
    )

    changed = await cleanup_offline_devices(ctx)

    assert changed == 1
    assert (await factory.reload_device(silent)).status == DeviceStatus.OFFLINE
    assert (await factory.reload_device(alive)).status == DeviceStatus.ONLINE
    assert (await factory.reload_device(registered)).status == DeviceStatus.REGISTERED
    events = await ctx.redis.xrange(ctx.keys.device_events_stream)
    assert [fields for _, fields in events] == [
        {b"device_id": str(silent.id).encode(), b"event": b"offline"}
    ]


async def test_cleanup_keeps_device_between_heartbeat_writes(ctx, factory):
    # A heartbeat timeout of two ping intervals is shorter than the two and a half that
    # a live connection's heartbeat can be old.
    settings = ctx.settings.model_copy(
        update={"WEBSOCKET_PING_INTERVAL": 60, "WEBSOCKET_HEARTBEAT_TIMEOUT": 120}
    )
    user = await factory.user()
    now = datetime.now(UTC)
    live = await factory.device(user, last_heartbeat=now - timedelta(seconds=150))
    silent = await factory.device(user, last_heartbeat=now - timedelta(seconds=190))

    changed = await cleanup_offline_devices(replace(ctx, settings=settings))

    assert changed == 1
    assert (await factory.reload_device(live)).status == DeviceStatus.ONLINE
    assert (await factory.reload_device(silent)).status == DeviceStatus.OFFLINE


async def test_cleaned_device_gets_no_assignments(ctx, factory):
    user = await factory.user()
    timeout_s = ctx.settings.WEBSOCKET_HEARTBEAT_TIMEOUT
    silent = await factory.device(
        user, last_heartbeat=datetime.now(UTC) - timedelta(seconds=timeout_s + 5)
    )
    await cleanup_offline_devices(ctx)
    message = await factory.message(user)

    plan = await assign_messages(ctx, [message.id])

    assert plan.assignments == []
    assert await _queued_ids(ctx, silent.id) == []


async def test_periodic_job_runs_once_per_interval(ctx):
    runs = []

    async def record(job_ctx) -> int:
        runs.append(job_ctx)
        return 0

    job = PeriodicJob("test.record", 60.0, record)

    await run_job_once(ctx, job)
    await run_job_once(ctx, job)

    assert len(runs) == 1


async def test_periodic_job_failure_not_raised(ctx):
    async def fail(job_ctx) -> int:
        raise ValueError("broken job")

    await run_job_once(ctx, PeriodicJob("test.fail", 60.0, fail))


async def test_periodic_jobs_stop_on_request(ctx):
    runs = []

    async def record(job_ctx) -> int:
        runs.append(1)
        return 0

    stop = asyncio.Event()
    task = asyncio.create_task(
        run_periodic_jobs(ctx, [PeriodicJob("test.fast", 0.05, record)], stop)
    )
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, scaled(2))

    assert len(runs) >= 2
