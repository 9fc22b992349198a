import asyncio
import uuid
from datetime import UTC, datetime

from redis.asyncio import Redis
from sqlalchemy import select, update

from mensajero_common import jsonutil, message_attempts, queues
from mensajero_common.db import driver_connection, session_scope
from mensajero_common.keys import RedisKeys
from mensajero_common.models import (
    AttemptStatus,
    DeviceStatus,
    MessageStatus,
    SMSDevice,
    SMSMessage,
    WebhookConfig,
    WebhookDelivery,
)
from mensajero_common.webhooks import EVENT_SMS_FAILED
from mensajero_dispatcher.messages import repository
from mensajero_dispatcher.messages.schemas import (
    Assignment,
    OnlineDevice,
    PendingMessage,
    RequestedDevice,
)
from mensajero_dispatcher.messages.service import (
    REQUESTED_DEVICE_DELETED,
    assign_messages,
    plan_assignments,
)


async def _queued_message_ids(
    redis: "Redis[bytes]", keys: RedisKeys, device_id: uuid.UUID
) -> list[uuid.UUID]:
    tasks = await queues.read_device_tasks(redis, keys, device_id)
    return [message_id for _, message_id, _ in tasks]


async def test_assign_to_requested_offline_device(ctx, factory, redis, redis_keys):
    user = await factory.user()
    requested = await factory.device(user, status=DeviceStatus.OFFLINE)
    await factory.device(user, status=DeviceStatus.ONLINE)
    message = await factory.message(user, requested_device=requested)

    plan = await assign_messages(ctx, [message.id])

    assert [item.device_id for item in plan.assignments] == [requested.id]
    stored = await factory.reload(message)
    assert stored.status == MessageStatus.ASSIGNED
    assert stored.device_id == requested.id
    assert stored.assigned_at is not None
    assert stored.attempts == 1
    tasks = await queues.read_device_tasks(redis, redis_keys, requested.id)
    assert len(tasks) == 1
    _, message_id, frame = tasks[0]
    assert message_id == message.id
    assert frame["type"] == "task"
    assert frame["message_id"] == str(message.id)
    assert frame["to"] == "+34600000001"
    assert frame["body"] == "Hola"
    assert frame["segments"] == 1
    assert frame["encoding"] == "gsm7"


async def test_assign_to_online_device_of_user(ctx, factory, redis, redis_keys):
    user = await factory.user()
    other_user = await factory.user()
    await factory.device(user, status=DeviceStatus.OFFLINE)
    await factory.device(user, status=DeviceStatus.ONLINE, is_active=False)
    await factory.device(other_user, status=DeviceStatus.ONLINE)
    online = await factory.device(user, status=DeviceStatus.ONLINE)
    message = await factory.message(user)

    await assign_messages(ctx, [message.id])

    stored = await factory.reload(message)
    assert stored.status == MessageStatus.ASSIGNED
    assert stored.device_id == online.id
    assert await _queued_message_ids(redis, redis_keys, online.id) == [message.id]


async def test_assign_spreads_load_over_online_devices(ctx, factory):
    user = await factory.user()
    first = await factory.device(user)
    second = await factory.device(user)
    # `first` already carries two messages in flight, so the next two go to `second`.
    await factory.message(user, status=MessageStatus.ASSIGNED, device=first)
    await factory.message(user, status=MessageStatus.SENDING, device=first)
    messages = [await factory.message(user) for _ in range(6)]

    plan = await assign_messages(ctx, [message.id for message in messages])

    chosen = [item.device_id for item in plan.assignments]
    assert len(chosen) == 6
    assert chosen[:2] == [second.id, second.id]
    assert chosen.count(first.id) == 2
    assert chosen.count(second.id) == 4


async def test_assign_without_online_device_leaves_pending(
    ctx, factory, redis, redis_keys
):
    user = await factory.user()
    offline = await factory.device(user, status=DeviceStatus.OFFLINE)
    message = await factory.message(user)

    plan = await assign_messages(ctx, [message.id])

    assert plan.assignments == []
    assert [item.id for item in plan.waiting] == [message.id]
    stored = await factory.reload(message)
    assert stored.status == MessageStatus.PENDING
    assert stored.device_id is None
    assert stored.attempts == 0
    assert await _queued_message_ids(redis, redis_keys, offline.id) == []


async def test_assign_skips_message_no_longer_pending(ctx, factory, redis, redis_keys):
    user = await factory.user()
    device = await factory.device(user)
    message = await factory.message(user)

    await assign_messages(ctx, [message.id])
    second_plan = await assign_messages(ctx, [message.id])

    assert second_plan.assignments == []
    stored = await factory.reload(message)
    assert stored.attempts == 1
    assert await _queued_message_ids(redis, redis_keys, device.id) == [message.id]


async def test_assign_waits_for_disabled_requested_device(ctx, factory):
    user = await factory.user()
    disabled = await factory.device(user, is_active=False)
    message = await factory.message(user, requested_device=disabled)
    await factory.device(user)

    plan = await assign_messages(ctx, [message.id])

    assert plan.assignments == []
    assert (await factory.reload(message)).status == MessageStatus.PENDING


async def test_assign_fails_message_of_deleted_device(ctx, factory, session_factory):
    user = await factory.user()
    requested = await factory.device(user)
    message = await factory.message(user, requested_device=requested)
    async with session_factory() as session:
        session.add(
            WebhookConfig(
                user_id=user.id,
                url="https://example.com/hook",
                secret_key="secret",
                events=[EVENT_SMS_FAILED],
            )
        )
        await session.delete(await session.get(type(requested), requested.id))
        await session.commit()

    plan = await assign_messages(ctx, [message.id])

    assert [item.message.id for item in plan.rejections] == [message.id]
    stored = await factory.reload(message)
    assert stored.status == MessageStatus.FAILED
    assert stored.error == REQUESTED_DEVICE_DELETED
    assert stored.failed_at is not None
    async with session_factory() as session:
        deliveries = (await session.scalars(select(WebhookDelivery))).all()
    assert len(deliveries) == 1
    assert deliveries[0].user_id == user.id


async def test_assign_batch_locks_rows_once(ctx, factory, session_factory):
    user = await factory.user()
    device = await factory.device(user)
    messages = [await factory.message(user) for _ in range(3)]
    ids = [message.id for message in messages]

    plan = await assign_messages(ctx, ids + ids)

    assert len(plan.assignments) == 3
    async with session_factory() as session:
        rows = (
            await session.scalars(select(SMSMessage).where(SMSMessage.id.in_(ids)))
        ).all()
    assert {row.device_id for row in rows} == {device.id}
    assert {row.attempts for row in rows} == {1}


async def test_mark_assigned_skips_changed_messages(ctx, factory, session_factory):
    user = await factory.user()
    device, other = await factory.device(user), await factory.device(user)
    assigned_elsewhere, retried, unchanged = [
        await factory.message(user) for _ in range(3)
    ]
    async with session_factory() as session:
        read = await repository.find_pending_by_ids(
            await driver_connection(session),
            [assigned_elsewhere.id, retried.id, unchanged.id],
        )
    # Since the read, another dispatcher assigned `assigned_elsewhere`, and `retried` went to a
    # device and came back to pending for its next attempt.
    async with session_factory() as session:
        await session.execute(
            update(SMSMessage)
            .where(SMSMessage.id == assigned_elsewhere.id)
            .values(status=MessageStatus.ASSIGNED, device_id=other.id, attempts=1)
        )
        await session.execute(
            update(SMSMessage).where(SMSMessage.id == retried.id).values(attempts=1)
        )
        await session.commit()

    async with session_factory() as session:
        assigned = await repository.mark_assigned(
            await driver_connection(session),
            [Assignment(message, device.id) for message in read],
        )
        await session.commit()

    assert assigned == {unchanged.id}
    assert (await factory.reload(assigned_elsewhere)).device_id == other.id
    stored_retry = await factory.reload(retried)
    assert stored_retry.status == MessageStatus.PENDING
    assert stored_retry.attempts == 1
    assert await factory.attempts(assigned_elsewhere) == []
    assert await factory.attempts(retried) == []
    assert [attempt.device_id for attempt in await factory.attempts(unchanged)] == [
        device.id
    ]


async def test_concurrent_assignments_assign_once(ctx, factory, redis, redis_keys):
    user = await factory.user()
    devices = [await factory.device(user) for _ in range(3)]
    messages = [await factory.message(user, age_s=60 - i) for i in range(6)]
    ids = [message.id for message in messages]

    plans = await asyncio.gather(*(assign_messages(ctx, ids) for _ in range(3)))

    assert sum(len(plan.assignments) for plan in plans) == len(messages)
    queued: list[uuid.UUID] = []
    for device in devices:
        queued += await _queued_message_ids(redis, redis_keys, device.id)
    assert sorted(queued) == sorted(ids)
    for message in messages:
        assert [
            attempt.attempt_number for attempt in await factory.attempts(message)
        ] == [1]


def test_plan_gives_requested_device_to_its_owner_only():
    owner = uuid.uuid4()
    stranger = uuid.uuid4()
    device_id = uuid.uuid4()
    message = PendingMessage(
        id=uuid.uuid4(),
        user_id=stranger,
        requested_device_id=device_id,
        to_number="+34600000001",
        body="x",
        segments=1,
        encoding="gsm7",
        created_at=datetime.now(UTC),
    )
    plan = plan_assignments(
        [message],
        [OnlineDevice(device_id, owner, 0)],
        {device_id: RequestedDevice(device_id, owner, True)},
    )

    assert plan.assignments == []
    assert [item.error for item in plan.rejections] == [REQUESTED_DEVICE_DELETED]


async def test_task_frame_is_json(ctx, factory, redis, redis_keys):
    user = await factory.user()
    device = await factory.device(user)
    message = await factory.message(user, body="Café ☕")

    await assign_messages(ctx, [message.id])

    entries = await redis.xrange(redis_keys.device_tasks_stream(device.id))
    frame = jsonutil.loads(entries[0][1][b"task"])
    assert frame["body"] == "Café ☕"
    assert frame["created_at"].startswith(str(message.created_at.year))


async def _fail_and_make_due(ctx, message, error):
    """End the current attempt as failed, the way the hub does, with the retry due now."""
    async with session_scope(ctx.session_factory) as session:
        locked = await message_attempts.lock_message(session, message.id)
        assert locked is not None
        end = await message_attempts.fail_attempt(
            session, ctx.settings, locked, error, retryable=True
        )
        assert end.status == MessageStatus.PENDING
        await session.execute(
            update(SMSMessage)
            .where(SMSMessage.id == message.id)
            .values(next_attempt_at=datetime.now(UTC))
        )


async def test_retry_assignment_clears_error(ctx, factory):
    user = await factory.user()
    await factory.device(user)
    message = await factory.message(user)
    await assign_messages(ctx, [message.id])
    await _fail_and_make_due(ctx, message, "RESULT_ERROR_GENERIC_FAILURE")
    waiting = await factory.reload(message)

    await assign_messages(ctx, [message.id])

    stored = await factory.reload(message)
    attempts = await factory.attempts(message)
    assert waiting.error == "RESULT_ERROR_GENERIC_FAILURE"
    assert stored.status == MessageStatus.ASSIGNED
    assert stored.attempts == 2
    assert stored.error is None
    assert [(row.status, row.error) for row in attempts] == [
        (AttemptStatus.FAILED, "RESULT_ERROR_GENERIC_FAILURE"),
        (AttemptStatus.ASSIGNED, None),
    ]


async def _set_status(session_factory, device, status):
    async with session_factory() as session:
        await session.execute(
            update(SMSDevice).where(SMSDevice.id == device.id).values(status=status)
        )
        await session.commit()


async def test_assignment_stores_device_number(ctx, factory, session_factory):
    user = await factory.user()
    numbered = await factory.device(user, phone_number="+525512345678")
    unnumbered = await factory.device(user, status=DeviceStatus.OFFLINE)
    message = await factory.message(user)

    await assign_messages(ctx, [message.id])
    first = await factory.reload(message)
    await _fail_and_make_due(ctx, message, "RESULT_ERROR_GENERIC_FAILURE")
    await _set_status(session_factory, numbered, DeviceStatus.OFFLINE)
    await _set_status(session_factory, unnumbered, DeviceStatus.ONLINE)
    await assign_messages(ctx, [message.id])
    second = await factory.reload(message)

    assert first.device_id == numbered.id
    assert first.from_number == "+525512345678"
    assert second.device_id == unnumbered.id
    assert second.from_number is None


def _carried(message: SMSMessage, **changes: object) -> PendingMessage:
    """The message as the API's stream entry carries it, with `changes` applied."""
    fields = {
        "id": message.id,
        "user_id": message.user_id,
        "requested_device_id": message.requested_device_id,
        "to_number": message.to_number or "",
        "body": message.body,
        "segments": message.segments,
        "encoding": message.encoding,
        "created_at": message.created_at,
        "expires_at": message.expires_at,
        **changes,
    }
    return PendingMessage.new(queues.NewMessage(**fields))


async def test_carried_messages_are_assigned_without_a_read(
    ctx, factory, redis, redis_keys, monkeypatch
):
    user = await factory.user()
    device = await factory.device(user)
    older = await factory.message(user, age_s=2, body="first")
    newer = await factory.message(user, body="second")
    signalled = await factory.message(user, age_s=1, body="by id")

    find_pending_by_ids = repository.find_pending_by_ids

    async def read_only_signalled(connection, message_ids):
        assert list(message_ids) == [signalled.id]
        return await find_pending_by_ids(connection, message_ids)

    monkeypatch.setattr(repository, "find_pending_by_ids", read_only_signalled)
    plan = await assign_messages(
        ctx, [signalled.id], [_carried(newer), _carried(older)]
    )

    # Oldest first, whether carried or read.
    assert [item.message.id for item in plan.assignments] == [
        older.id,
        signalled.id,
        newer.id,
    ]
    for message in (older, newer, signalled):
        stored = await factory.reload(message)
        assert (stored.status, stored.device_id) == (MessageStatus.ASSIGNED, device.id)
        assert stored.attempts == 1
    tasks = await queues.read_device_tasks(redis, redis_keys, device.id)
    frames = {message_id: frame for _, message_id, frame in tasks}
    assert frames[older.id]["body"] == "first"
    assert frames[older.id]["attempt"] == 1
    assert frames[newer.id]["created_at"] == jsonutil.loads(
        jsonutil.dumps(newer.created_at)
    )


async def test_carried_message_no_longer_pending_is_left_alone(
    ctx, factory, redis, redis_keys
):
    user = await factory.user()
    device = await factory.device(user)
    failed = await factory.message(user, status=MessageStatus.FAILED)
    expired = await factory.message(user, expires_at=datetime(2020, 1, 1, tzinfo=UTC))
    retried = await factory.message(user, attempts=1)

    plan = await assign_messages(
        ctx, [], [_carried(failed), _carried(expired), _carried(retried)]
    )

    assert plan.assignments == []
    assert (await factory.reload(failed)).status == MessageStatus.FAILED
    for message in (expired, retried):
        stored = await factory.reload(message)
        assert (stored.status, stored.device_id) == (MessageStatus.PENDING, None)
    assert await queues.read_device_tasks(redis, redis_keys, device.id) == []
    for message in (failed, expired, retried):
        assert await factory.attempts(message) == []


async def test_carried_message_for_deleted_device_fails(ctx, factory):
    user = await factory.user()
    await factory.device(user)
    message = await factory.message(user)

    plan = await assign_messages(
        ctx, [], [_carried(message, requested_device_id=uuid.uuid4())]
    )

    assert [item.error for item in plan.rejections] == [REQUESTED_DEVICE_DELETED]
    stored = await factory.reload(message)
    assert (stored.status, stored.error) == (
        MessageStatus.FAILED,
        REQUESTED_DEVICE_DELETED,
    )
