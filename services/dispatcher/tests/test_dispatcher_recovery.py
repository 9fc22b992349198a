import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from mensajero_common import jsonutil
from mensajero_common.keys import CHANNEL_WAKE
from mensajero_common.models import DeviceStatus, MessageStatus, SMSMessage
from mensajero_common.testing import scaled
from mensajero_dispatcher.messages.service import assign_messages
from mensajero_dispatcher.recovery import service as recovery_service
from mensajero_dispatcher.recovery.service import recover_stale_messages


async def _task_ids(ctx, device_id):
    entries = await ctx.redis.xrange(ctx.keys.device_tasks_stream(device_id))
    return [jsonutil.loads(fields[b"task"])["message_id"] for _, fields in entries]


async def test_recovery_restores_lost_streams(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    stale_age_s = ctx.settings.RECOVERY_STALE_AFTER_S + 60
    assigned = await factory.message(
        user, status=MessageStatus.ASSIGNED, device=device, age_s=stale_age_s
    )
    sending = await factory.message(
        user, status=MessageStatus.SENDING, device=device, age_s=stale_age_s
    )
    pending = await factory.message(user, age_s=stale_age_s)
    pubsub = ctx.redis.pubsub()
    await pubsub.subscribe(ctx.keys.device_channel(device.id))

    handled = await recover_stale_messages(ctx)

    assert handled == 3
    assert sorted(await _task_ids(ctx, device.id)) == sorted(
        [str(assigned.id), str(sending.id), str(pending.id)]
    )
    assert (await factory.reload(pending)).status == MessageStatus.ASSIGNED
    assert (await factory.reload(sending)).status == MessageStatus.SENDING
    wakes = []
    async with asyncio.timeout(scaled(5)):
        while CHANNEL_WAKE.encode() not in wakes:
            message = await pubsub.get_message(timeout=1)
            if message is not None and message["type"] == "message":
                wakes.append(message["data"])
    await pubsub.aclose()


async def test_recovery_handles_each_message_once(ctx, factory):
    user = await factory.user()
    await factory.device(user, status=DeviceStatus.OFFLINE)
    stale_age_s = ctx.settings.RECOVERY_STALE_AFTER_S + 60
    waiting = await factory.message(user, age_s=stale_age_s)

    first = await recover_stale_messages(ctx)
    second = await recover_stale_messages(ctx)

    stored = await factory.reload(waiting)
    assert first == 1
    assert second == 0
    assert stored.status == MessageStatus.PENDING
    # The sweep keeps its place in Redis, so the message does not look changed.
    assert stored.updated_at == waiting.updated_at


async def test_recovery_pass_spans_runs(ctx, factory, monkeypatch):
    monkeypatch.setattr(recovery_service, "BATCH_SIZE", 2)
    monkeypatch.setattr(recovery_service, "MAX_BATCHES_PER_RUN", 1)
    user = await factory.user()
    await factory.device(user, status=DeviceStatus.OFFLINE)
    stale_age_s = ctx.settings.RECOVERY_STALE_AFTER_S + 60
    waiting = [await factory.message(user, age_s=stale_age_s + i) for i in range(5)]

    handled = [await recover_stale_messages(ctx) for _ in range(4)]

    assert handled == [2, 2, 1, 0]
    for message in waiting:
        stored = await factory.reload(message)
        assert stored.status == MessageStatus.PENDING
        assert stored.updated_at == message.updated_at


async def test_recovery_starts_new_pass_later(ctx, factory):
    stale_after_s = 1.0
    quick = replace(
        ctx,
        settings=ctx.settings.model_copy(
            update={"RECOVERY_STALE_AFTER_S": stale_after_s}
        ),
    )
    user = await factory.user()
    await factory.device(user, status=DeviceStatus.OFFLINE)
    await factory.message(user, age_s=60)
    await factory.message(user, age_s=60)

    first = await recover_stale_messages(quick)
    second = await recover_stale_messages(quick)
    await asyncio.sleep(stale_after_s)
    third = await recover_stale_messages(quick)

    assert first == 2
    assert second == 0
    assert third == 2


async def test_recovery_ignores_invalid_progress(ctx, factory):
    user = await factory.user()
    await factory.device(user, status=DeviceStatus.OFFLINE)
    await factory.message(user, age_s=ctx.settings.RECOVERY_STALE_AFTER_S + 60)
    await ctx.redis.set(ctx.keys.recovery_sweep_progress, b"not json")

    handled = await recover_stale_messages(ctx)

    assert handled == 1


async def test_recovery_skips_fresh_and_delayed(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    stale_age_s = ctx.settings.RECOVERY_STALE_AFTER_S + 60
    fresh = await factory.message(user, status=MessageStatus.ASSIGNED, device=device)
    delayed = await factory.message(
        user,
        age_s=stale_age_s,
        attempts=1,
        next_attempt_at=datetime.now(UTC) + timedelta(hours=1),
    )
    delivered = await factory.message(
        user, status=MessageStatus.DELIVERED, device=device, age_s=stale_age_s
    )

    handled = await recover_stale_messages(ctx)

    assert handled == 0
    assert await _task_ids(ctx, device.id) == []
    assert (await factory.reload(delayed)).status == MessageStatus.PENDING
    assert (await factory.reload(fresh)).status == MessageStatus.ASSIGNED
    assert (await factory.reload(delivered)).status == MessageStatus.DELIVERED


async def test_recovery_leaves_queued_tasks(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    message = await factory.message(user)
    await assign_messages(ctx, [message.id])
    stale_age_s = ctx.settings.RECOVERY_STALE_AFTER_S + 60
    async with ctx.session_factory() as session:
        await session.execute(
            update(SMSMessage)
            .where(SMSMessage.id == message.id)
            .values(updated_at=datetime.now(UTC) - timedelta(seconds=stale_age_s))
        )
        await session.commit()

    handled = await recover_stale_messages(ctx)

    assert handled == 1
    assert await _task_ids(ctx, device.id) == [str(message.id)]
