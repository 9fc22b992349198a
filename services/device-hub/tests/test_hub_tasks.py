import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from hub_helpers import (
    DeviceRecord,
    create_device,
    create_outgoing,
    eventually,
    load_message,
    open_socket,
    receive,
    receive_type,
    request,
)
from redis.asyncio import Redis
from sqlalchemy import Engine, event, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from websockets.asyncio.client import ClientConnection

from mensajero_common import jsonutil, protocol, queues
from mensajero_common.keys import CHANNEL_TASK_PREFIX, RedisKeys
from mensajero_common.models import (
    MessageStatus,
    SMSMessage,
    WebhookConfig,
    WebhookEvent,
)
from mensajero_common.settings import Settings
from mensajero_common.testing import scaled
from mensajero_hub.core.session import PUSH_RETRY_MAX_DELAY_S, push_retry_delay_s

Sessions = async_sessionmaker[AsyncSession]


def task_frame_of(message: SMSMessage) -> dict[str, Any]:
    return protocol.task_frame(
        message.id,
        message.to_number or "",
        message.body,
        segments=message.segments,
        encoding=message.encoding,
        created_at=message.created_at,
        expires_at=message.expires_at,
    )


async def push_task(
    redis: Redis, keys: RedisKeys, device: DeviceRecord, message: SMSMessage
) -> None:
    await queues.push_device_task(
        redis, keys, device.device_id, message.id, task_frame_of(message)
    )


async def report(
    socket: ClientConnection,
    message_id: uuid.UUID,
    status: str,
    error: str | None = None,
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "sms_report",
        "message_id": str(message_id),
        "status": status,
    }
    if error is not None:
        frame["error"] = error
    return await request(socket, frame)


async def stream_message_ids(
    redis: Redis, keys: RedisKeys, device: DeviceRecord
) -> list[str]:
    entries = await redis.xrange(keys.device_tasks_stream(device.device_id))
    return [fields[b"message_id"].decode() for _, fields in entries]


async def test_pushed_task_reaches_socket_at_once(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, {"type": "ping"})
        started = asyncio.get_running_loop().time()
        await push_task(redis, redis_keys, device, message)
        task = await receive(socket)
        latency_s = asyncio.get_running_loop().time() - started

    assert task["type"] == "task"
    assert task["message_id"] == str(message.id)
    assert task["to"] == "+34600000001"
    assert task["body"] == "Hola desde Mensajero"
    assert task["segments"] == 1
    assert task["encoding"] == "gsm7"
    assert latency_s < scaled(0.5)


async def test_tasks_queued_offline_arrive_on_connect(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    messages = [await create_outgoing(session_factory, device) for _ in range(3)]
    for message in messages:
        await push_task(redis, redis_keys, device, message)

    async with open_socket(hub_url, device.api_key) as socket:
        tasks = [await receive_type(socket, "task") for _ in messages]

    assert [task["message_id"] for task in tasks] == [str(m.id) for m in messages]


async def test_many_queued_tasks_arrive_in_order(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    # More than one read batch of the stream.
    device = await create_device(session_factory)
    messages = [await create_outgoing(session_factory, device) for _ in range(130)]
    for message in messages:
        await push_task(redis, redis_keys, device, message)

    async with open_socket(hub_url, device.api_key) as socket:
        tasks = [await receive_type(socket, "task") for _ in messages]

    assert [task["message_id"] for task in tasks] == [str(m.id) for m in messages]


async def test_wake_never_pushes_task_twice(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    first = await create_outgoing(session_factory, device)
    second = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        await push_task(redis, redis_keys, device, first)
        # The same message queued again, as a sweep that thinks Redis lost it would do.
        await push_task(redis, redis_keys, device, first)
        await push_task(redis, redis_keys, device, second)
        received = [await receive_type(socket, "task") for _ in range(2)]
        pong = await request(socket, {"type": "ping"})

    assert [task["message_id"] for task in received] == [str(first.id), str(second.id)]
    assert pong["type"] == "pong"


async def test_unreported_task_is_offered_again_on_reconnect(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)
    await push_task(redis, redis_keys, device, message)

    async with open_socket(hub_url, device.api_key) as socket:
        await receive_type(socket, "task")
        await report(socket, message.id, "sending")
    async with open_socket(hub_url, device.api_key) as socket:
        again = await receive_type(socket, "task")

    assert again["message_id"] == str(message.id)


async def test_stale_task_is_dropped_not_pushed(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    other = await create_device(session_factory, user_id=device.user_id)
    failed = await create_outgoing(session_factory, device, status=MessageStatus.FAILED)
    moved = await create_outgoing(session_factory, other)
    live = await create_outgoing(session_factory, device)
    for message in (failed, moved, live):
        await push_task(redis, redis_keys, device, message)

    async with open_socket(hub_url, device.api_key) as socket:
        task = await receive_type(socket, "task")
        await request(socket, {"type": "ping"})

    assert task["message_id"] == str(live.id)
    assert await stream_message_ids(redis, redis_keys, device) == [str(live.id)]


async def test_rejected_register_still_gets_tasks(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        rejected = await request(socket, {"type": "register", "device_name": "a\tb"})
        await push_task(redis, redis_keys, device, message)
        task = await receive_type(socket, "task")
        ack = await report(socket, message.id, "sending")

    row = await load_message(session_factory, message.id)
    assert rejected["type"] == "error"
    assert rejected["error"] == "invalid_frame"
    assert task["message_id"] == str(message.id)
    assert ack["type"] == "ack"
    assert ack["status"] == "sending"
    assert row.status == MessageStatus.SENDING


@contextlib.contextmanager
def message_queries() -> Iterator[list[str]]:
    """Record the SELECTs on smsmessage that any engine of this process runs."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        statement = str(args[2])
        if (
            statement.lstrip().upper().startswith("SELECT")
            and "smsmessage" in statement
        ):
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


@contextlib.contextmanager
def backlog_check_fails(times: int) -> Iterator[list[str]]:
    """Make the hub's first `times` backlog checks in Postgres fail as a refused
    connection does, and record the statements that failed."""
    failed: list[str] = []

    def fail(*args: Any) -> None:
        statement = str(args[2])
        if len(failed) < times and statement.lstrip().startswith(
            "SELECT smsmessage.id, smsmessage.attempts"
        ):
            failed.append(statement)
            raise ConnectionRefusedError("Postgres unavailable (injected by the test)")

    event.listen(Engine, "before_cursor_execute", fail)
    try:
        yield failed
    finally:
        event.remove(Engine, "before_cursor_execute", fail)


async def test_backlog_pushed_after_failed_check(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)
    await push_task(redis, redis_keys, device, message)

    with backlog_check_fails(times=2) as failed:
        async with open_socket(hub_url, device.api_key) as socket:
            # Retried after 1 s, then 2 s, on the same connection.
            task = await receive_type(socket, "task", timeout_s=10.0)

    assert len(failed) == 2
    assert task["message_id"] == str(message.id)


async def test_live_task_pushed_without_query(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    first = await create_outgoing(session_factory, device)
    second = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        # The first task ends the connection's backlog read, whichever read finds it.
        await push_task(redis, redis_keys, device, first)
        await receive_type(socket, "task")
        with message_queries() as queries:
            await push_task(redis, redis_keys, device, second)
            task = await receive_type(socket, "task")

    assert task["message_id"] == str(second.id)
    assert queries == []


async def test_live_expired_task_is_dropped_not_pushed(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    past = datetime.now(UTC) - timedelta(seconds=1)
    expired = await create_outgoing(session_factory, device, expires_at=past)
    live = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, {"type": "ping"})
        await push_task(redis, redis_keys, device, expired)
        await push_task(redis, redis_keys, device, live)
        task = await receive_type(socket, "task")
        await request(socket, {"type": "ping"})

    assert task["message_id"] == str(live.id)
    assert await stream_message_ids(redis, redis_keys, device) == [str(live.id)]


async def test_reports_move_status_forward(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)
    await push_task(redis, redis_keys, device, message)

    async with open_socket(hub_url, device.api_key) as socket:
        await receive_type(socket, "task")
        sending = await report(socket, message.id, "sending")
        in_stream_after_sending = await stream_message_ids(redis, redis_keys, device)
        sent = await report(socket, message.id, "sent")
        in_stream_after_sent = await stream_message_ids(redis, redis_keys, device)
        delivered = await report(socket, message.id, "delivered")

    row = await load_message(session_factory, message.id)
    assert sending["type"] == "ack"
    assert sending["of"] == "sms_report"
    assert sending["message_id"] == str(message.id)
    assert sending["status"] == "sending"
    assert sent["status"] == "sent"
    assert delivered["status"] == "delivered"
    assert in_stream_after_sending == [str(message.id)]
    assert in_stream_after_sent == []
    assert row.status == MessageStatus.DELIVERED
    assert row.sending_at is not None
    assert row.sent_at is not None
    assert row.delivered_at is not None


async def test_late_sent_after_delivered_changes_nothing(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        await report(socket, message.id, "delivered")
        before = await load_message(session_factory, message.id)
        late = await report(socket, message.id, "sent")

    after = await load_message(session_factory, message.id)
    assert late["type"] == "ack"
    assert late["status"] == "delivered"
    assert after.status == MessageStatus.DELIVERED
    assert after.sent_at == before.sent_at
    assert after.updated_at == before.updated_at


async def test_duplicate_report_is_acked_unchanged(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        await report(socket, message.id, "sent")
        before = await load_message(session_factory, message.id)
        again = await report(socket, message.id, "sent")

    after = await load_message(session_factory, message.id)
    assert again["type"] == "ack"
    assert again["status"] == "sent"
    assert after.sent_at == before.sent_at
    assert after.updated_at == before.updated_at


async def test_failed_report_stores_error(
    hub_url: str,
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(
        session_factory, device, attempts=settings.MESSAGE_MAX_ATTEMPTS
    )
    await push_task(redis, redis_keys, device, message)

    async with open_socket(hub_url, device.api_key) as socket:
        await receive_type(socket, "task")
        ack = await report(
            socket, message.id, "failed", error="RESULT_ERROR_NO_SERVICE"
        )
        late = await report(socket, message.id, "sent")

    row = await load_message(session_factory, message.id)
    assert ack["status"] == "failed"
    assert late["status"] == "failed"
    assert row.status == MessageStatus.FAILED
    assert row.error == "RESULT_ERROR_NO_SERVICE"
    assert row.failed_at is not None
    assert await stream_message_ids(redis, redis_keys, device) == []


async def test_report_for_other_device_rejected(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    other = await create_device(session_factory)
    message = await create_outgoing(session_factory, other)

    async with open_socket(hub_url, device.api_key) as socket:
        error = await report(socket, message.id, "sent")
        unknown = await report(socket, uuid.uuid4(), "sent")
        pong = await request(socket, {"type": "ping"})

    row = await load_message(session_factory, message.id)
    assert error["type"] == "error"
    assert error["error"] == "report_not_allowed"
    assert error["message_id"] == str(message.id)
    assert str(message.id) in error["message"]
    assert unknown["error"] == "report_not_allowed"
    assert pong["type"] == "pong"
    assert row.status == MessageStatus.ASSIGNED
    assert row.sent_at is None


async def test_report_records_webhook_event(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)
    async with session_factory() as db:
        db.add(
            WebhookConfig(
                user_id=device.user_id,
                url="https://example.com/hook",
                secret_key="whsec_test",
                events=["sms_sent", "sms_delivered"],
            )
        )
        await db.commit()

    async with open_socket(hub_url, device.api_key) as socket:
        await report(socket, message.id, "sent")
        await report(socket, message.id, "sent")
        await report(socket, message.id, "delivered")

    async def queued_jobs() -> bool:
        return bool(await redis.zcard(redis_keys.arq_queue) == 2)

    await eventually(queued_jobs)
    async with session_factory() as db:
        events = (
            await db.execute(
                select(WebhookEvent.event)
                .where(WebhookEvent.message_id == message.id)
                .order_by(WebhookEvent.created_at)
            )
        ).scalars()
        assert list(events) == ["sms_sent", "sms_delivered"]


async def test_carried_task_pushed_without_read(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    first = await create_outgoing(session_factory, device)
    second = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        await push_task(redis, redis_keys, device, first)
        await receive_type(socket, "task")
        (last_id,) = await redis.xrange(
            redis_keys.device_tasks_stream(device.device_id)
        )
        # Published by hand with no stream entry behind it, so only a hub that takes
        # the task from the message can push it.
        await redis.publish(
            redis_keys.device_channel(device.device_id),
            b" ".join(
                [
                    CHANNEL_TASK_PREFIX.rstrip().encode(),
                    last_id[0],
                    b"9999999999999-0",
                    str(second.id).encode(),
                    jsonutil.dumps(task_frame_of(second)),
                ]
            ),
        )
        task = await receive_type(socket, "task")

    assert task["message_id"] == str(second.id)


async def test_task_after_unread_entry_reads_stream(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    first, unannounced, last = [
        await create_outgoing(session_factory, device) for _ in range(3)
    ]

    async with open_socket(hub_url, device.api_key) as socket:
        await push_task(redis, redis_keys, device, first)
        await receive_type(socket, "task")
        # An entry whose message never reached the hub, as when pub/sub drops it.
        await redis.xadd(
            redis_keys.device_tasks_stream(device.device_id),
            {
                "message_id": str(unannounced.id),
                "task": jsonutil.dumps(task_frame_of(unannounced)),
            },
        )
        await push_task(redis, redis_keys, device, last)
        tasks = [await receive_type(socket, "task") for _ in range(2)]

    assert [task["message_id"] for task in tasks] == [
        str(unannounced.id),
        str(last.id),
    ]


def test_push_retry_delay_doubles_to_max() -> None:
    delays = [push_retry_delay_s(failures) for failures in (1, 2, 3, 5, 6)]

    assert delays == [1.0, 2.0, 4.0, 16.0, PUSH_RETRY_MAX_DELAY_S]
    # From 1,025 failures on (about 8.5 hours at the maximum delay), 1.0 * 2 ** (n - 1)
    # overflows a float.
    assert push_retry_delay_s(1025) == PUSH_RETRY_MAX_DELAY_S
    assert push_retry_delay_s(100_000) == PUSH_RETRY_MAX_DELAY_S
