import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from sqlalchemy import text, update

from mensajero_common import queues
from mensajero_common.models import DeviceStatus, MessageStatus, SMSDevice
from mensajero_common.testing import scaled
from mensajero_dispatcher.consumer import READ_BLOCK_MS, StreamConsumer
from mensajero_dispatcher.context import DispatcherContext


def make_consumer(ctx, name=None, **options) -> StreamConsumer:
    # A short block lets each test stop its consumer quickly.
    options.setdefault("read_block_ms", 100)
    return StreamConsumer(ctx, name, **options)


@asynccontextmanager
async def running(consumer: StreamConsumer) -> AsyncIterator[StreamConsumer]:
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, scaled(5))


def status_is(factory, message, status: MessageStatus) -> Callable:
    async def check() -> bool:
        return (await factory.reload(message)).status == status

    return check


async def stream_drained(ctx: DispatcherContext, stream: str) -> bool:
    pending = await ctx.redis.xpending(stream, ctx.keys.dispatcher_group)
    return pending["pending"] == 0 and await ctx.redis.xlen(stream) == 0


async def test_consumer_assigns_signalled_message(ctx, factory, wait_until):
    user = await factory.user()
    device = await factory.device(user)
    message = await factory.message(user)

    async with running(make_consumer(ctx)):
        await queues.signal_new_messages(ctx.redis, ctx.keys, [message.id])
        await wait_until(status_is(factory, message, MessageStatus.ASSIGNED))
        await wait_until(lambda: stream_drained(ctx, ctx.keys.new_messages_stream))

    assert (await factory.reload(message)).device_id == device.id


async def test_consumer_assigns_on_online_event(
    ctx, factory, session_factory, wait_until
):
    user = await factory.user()
    device = await factory.device(user, status=DeviceStatus.OFFLINE)
    disabled = await factory.device(user, is_active=False)
    message = await factory.message(user)
    for_disabled = await factory.message(user, requested_device=disabled)

    async with running(make_consumer(ctx)):
        await queues.signal_new_messages(
            ctx.redis, ctx.keys, [message.id, for_disabled.id]
        )
        await wait_until(lambda: stream_drained(ctx, ctx.keys.new_messages_stream))
        assert (await factory.reload(message)).status == MessageStatus.PENDING

        async with session_factory() as session:
            await session.execute(
                update(SMSDevice)
                .where(SMSDevice.id == device.id)
                .values(status=DeviceStatus.ONLINE)
            )
            await session.commit()
        await queues.signal_device_event(ctx.redis, ctx.keys, device.id, "online")
        await wait_until(status_is(factory, message, MessageStatus.ASSIGNED))
        await wait_until(lambda: stream_drained(ctx, ctx.keys.device_events_stream))

    assert (await factory.reload(message)).device_id == device.id
    assert (await factory.reload(for_disabled)).status == MessageStatus.PENDING
    tasks = await queues.read_device_tasks(ctx.redis, ctx.keys, device.id)
    assert [message_id for _, message_id, _ in tasks] == [message.id]


async def test_online_event_pages_past_batch(ctx, factory, session_factory, wait_until):
    user = await factory.user()
    device = await factory.device(user, status=DeviceStatus.OFFLINE)
    messages = [await factory.message(user, age_s=300 - i) for i in range(130)]
    async with session_factory() as session:
        await session.execute(
            update(SMSDevice)
            .where(SMSDevice.id == device.id)
            .values(status=DeviceStatus.ONLINE)
        )
        await session.commit()

    async with running(make_consumer(ctx)):
        await queues.signal_device_event(ctx.redis, ctx.keys, device.id, "online")
        await wait_until(status_is(factory, messages[-1], MessageStatus.ASSIGNED))

    tasks = await queues.read_device_tasks(ctx.redis, ctx.keys, device.id, count=200)
    # Oldest first, so the phone sends them in the order they were requested.
    assert [message_id for _, message_id, _ in tasks] == [m.id for m in messages]


async def test_consumer_assigns_duplicate_entry_once(ctx, factory, wait_until):
    user = await factory.user()
    device = await factory.device(user)
    message = await factory.message(user)

    async with running(make_consumer(ctx)):
        await queues.signal_new_messages(ctx.redis, ctx.keys, [message.id])
        await queues.signal_new_messages(ctx.redis, ctx.keys, [message.id])
        await wait_until(status_is(factory, message, MessageStatus.ASSIGNED))
        await wait_until(lambda: stream_drained(ctx, ctx.keys.new_messages_stream))

    stored = await factory.reload(message)
    assert stored.attempts == 1
    tasks = await queues.read_device_tasks(ctx.redis, ctx.keys, device.id)
    assert [message_id for _, message_id, _ in tasks] == [message.id]


async def _waits_on_row_lock(session_factory) -> bool:
    async with session_factory() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


async def test_blocked_batch_does_not_hold_next(
    ctx, factory, session_factory, wait_until
):
    blocked_user, other_user = await factory.user(), await factory.user()
    blocked_device = await factory.device(blocked_user)
    other_device = await factory.device(other_user)
    blocked = await factory.message(blocked_user)
    later = await factory.message(other_user)

    async with session_factory() as blocker, running(make_consumer(ctx)):
        # While this transaction holds the device row, assigning a message to the
        # device waits, because its foreign key check needs a share lock on that row.
        await blocker.execute(
            text("SELECT id FROM smsdevice WHERE id = :id FOR UPDATE"),
            {"id": blocked_device.id},
        )
        await queues.signal_new_messages(ctx.redis, ctx.keys, [blocked.id])
        await wait_until(lambda: _waits_on_row_lock(session_factory))

        await queues.signal_new_messages(ctx.redis, ctx.keys, [later.id])
        await wait_until(status_is(factory, later, MessageStatus.ASSIGNED))
        assert (await factory.reload(blocked)).status == MessageStatus.PENDING

        await blocker.rollback()
        await wait_until(status_is(factory, blocked, MessageStatus.ASSIGNED))
        await wait_until(lambda: stream_drained(ctx, ctx.keys.new_messages_stream))

    assert (await factory.reload(blocked)).device_id == blocked_device.id
    assert (await factory.reload(later)).device_id == other_device.id


async def _deliver_without_ack(ctx: DispatcherContext, consumer_name: str) -> None:
    """Read the new-message stream as `consumer_name` and never acknowledge: a dispatcher
    that died right after reading."""
    await ctx.redis.xgroup_create(
        ctx.keys.new_messages_stream, ctx.keys.dispatcher_group, id="0", mkstream=True
    )
    await ctx.redis.xreadgroup(
        ctx.keys.dispatcher_group,
        consumer_name,
        {ctx.keys.new_messages_stream: ">"},
        count=10,
    )


async def test_consumer_claims_entries_of_dead_consumer(ctx, factory, wait_until):
    user = await factory.user()
    await factory.device(user)
    message = await factory.message(user)
    await queues.signal_new_messages(ctx.redis, ctx.keys, [message.id])
    await _deliver_without_ack(ctx, "dead-host-1")

    async with running(make_consumer(ctx, claim_idle_ms=0)):
        await wait_until(status_is(factory, message, MessageStatus.ASSIGNED))
        await wait_until(lambda: stream_drained(ctx, ctx.keys.new_messages_stream))


async def test_consumer_reads_own_pending_on_start(ctx, factory, wait_until):
    user = await factory.user()
    await factory.device(user)
    message = await factory.message(user)
    await queues.signal_new_messages(ctx.redis, ctx.keys, [message.id])
    await _deliver_without_ack(ctx, "restarted-host-7")

    consumer = make_consumer(ctx, "restarted-host-7", claim_idle_ms=3_600_000)
    async with running(consumer):
        await wait_until(status_is(factory, message, MessageStatus.ASSIGNED))
        await wait_until(lambda: stream_drained(ctx, ctx.keys.new_messages_stream))


async def test_consumer_survives_redis_flush(ctx, factory, wait_until):
    user = await factory.user()
    await factory.device(user)
    first = await factory.message(user)
    second = await factory.message(user)

    async with running(make_consumer(ctx)):
        await queues.signal_new_messages(ctx.redis, ctx.keys, [first.id])
        await wait_until(status_is(factory, first, MessageStatus.ASSIGNED))
        await ctx.redis.delete(
            ctx.keys.new_messages_stream, ctx.keys.device_events_stream
        )
        await queues.signal_new_messages(ctx.redis, ctx.keys, [second.id])
        await wait_until(status_is(factory, second, MessageStatus.ASSIGNED))


async def test_consumer_drops_invalid_entries(ctx, factory, wait_until):
    user = await factory.user()
    await factory.device(user)
    message = await factory.message(user)
    await ctx.redis.xadd(ctx.keys.new_messages_stream, {"message_id": "not-a-uuid"})
    await ctx.redis.xadd(ctx.keys.device_events_stream, {"event": "online"})

    async with running(make_consumer(ctx)):
        await queues.signal_new_messages(ctx.redis, ctx.keys, [message.id])
        await wait_until(status_is(factory, message, MessageStatus.ASSIGNED))
        await wait_until(lambda: stream_drained(ctx, ctx.keys.new_messages_stream))
        await wait_until(lambda: stream_drained(ctx, ctx.keys.device_events_stream))


async def test_consumer_stops_within_read_block(ctx):
    stop = asyncio.Event()
    task = asyncio.create_task(StreamConsumer(ctx).run(stop))
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()

    stop.set()
    await asyncio.wait_for(task, scaled(5))

    assert loop.time() - started < scaled(READ_BLOCK_MS / 1000 + 1)


async def test_consumer_assigns_message_its_entry_carries(ctx, factory, wait_until):
    user = await factory.user()
    device = await factory.device(user)
    carried = await factory.message(user, body="carried")
    by_id = await factory.message(user)

    async with running(make_consumer(ctx)):
        await queues.signal_new_message(
            ctx.redis,
            ctx.keys,
            queues.NewMessage(
                id=carried.id,
                user_id=user.id,
                requested_device_id=None,
                to_number=carried.to_number or "",
                body=carried.body,
                segments=carried.segments,
                encoding=carried.encoding,
                created_at=carried.created_at,
                expires_at=None,
            ),
        )
        await queues.signal_new_messages(ctx.redis, ctx.keys, [by_id.id])
        await wait_until(status_is(factory, carried, MessageStatus.ASSIGNED))
        await wait_until(status_is(factory, by_id, MessageStatus.ASSIGNED))
        await wait_until(lambda: stream_drained(ctx, ctx.keys.new_messages_stream))

    tasks = await queues.read_device_tasks(ctx.redis, ctx.keys, device.id)
    assert {message_id: frame["body"] for _, message_id, frame in tasks} == {
        carried.id: "carried",
        by_id.id: by_id.body,
    }
