import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hub_helpers import (
    DeviceRecord,
    create_device,
    create_outgoing,
    load_message,
    open_socket,
    receive_type,
    request,
)
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common import jsonutil, protocol, queues
from mensajero_common.keys import RedisKeys
from mensajero_common.models import (
    AttemptStatus,
    MessageStatus,
    SMSMessage,
    SMSMessageAttempt,
    SMSMessagePart,
    UserPlan,
    UserQuota,
    WebhookConfig,
    WebhookEvent,
)
from mensajero_common.settings import Settings
from mensajero_common.webhooks import EVENTS
from mensajero_hub.core.reports import PartReport, aggregate_parts
from mensajero_hub.core.state import ConnectionState, TaskEntry

Sessions = async_sessionmaker[AsyncSession]


async def push_task(
    redis: Redis, keys: RedisKeys, device: DeviceRecord, message: SMSMessage
) -> None:
    frame = protocol.task_frame(
        message.id,
        message.to_number or "",
        message.body,
        segments=message.segments,
        encoding=message.encoding,
        created_at=message.created_at,
        attempt=message.attempts,
        expires_at=message.expires_at,
    )
    await queues.push_device_task(redis, keys, device.device_id, message.id, frame)


async def report(socket: Any, message_id: uuid.UUID, **fields: Any) -> dict[str, Any]:
    return await request(
        socket, {"type": "sms_report", "message_id": str(message_id), **fields}
    )


async def subscribe_to_all(sessions: Sessions, device: DeviceRecord) -> None:
    async with sessions() as db:
        db.add(
            WebhookConfig(
                user_id=device.user_id,
                url="https://example.com/hook",
                secret_key="secret",
                events=list(EVENTS),
            )
        )
        await db.commit()


async def event_names(sessions: Sessions, message_id: uuid.UUID) -> list[str]:
    async with sessions() as db:
        rows = await db.scalars(
            select(WebhookEvent.event)
            .where(WebhookEvent.message_id == message_id)
            .order_by(WebhookEvent.created_at)
        )
        return list(rows)


async def attempt_rows(
    sessions: Sessions, message_id: uuid.UUID
) -> list[SMSMessageAttempt]:
    async with sessions() as db:
        rows = await db.scalars(
            select(SMSMessageAttempt)
            .where(SMSMessageAttempt.message_id == message_id)
            .order_by(SMSMessageAttempt.attempt_number)
        )
        return list(rows)


async def queued_attempts(
    redis: Redis, keys: RedisKeys, device: DeviceRecord
) -> list[int]:
    entries = await redis.xrange(keys.device_tasks_stream(device.device_id))
    return [jsonutil.loads(fields[b"task"]).get("attempt") for _, fields in entries]


def part(number: int, parts: int, status: str) -> PartReport:
    return PartReport(
        number, parts, MessageStatus(status), "E" if status == "failed" else None
    )


@pytest.mark.parametrize(
    ("reports", "expected"),
    [
        ([part(2, 2, "delivered")], MessageStatus.SENDING),
        ([part(2, 2, "delivered"), part(1, 2, "sent")], MessageStatus.SENT),
        ([part(2, 2, "delivered"), part(1, 2, "delivered")], MessageStatus.DELIVERED),
        ([part(1, 3, "sent"), part(3, 3, "failed")], MessageStatus.FAILED),
        ([part(1, 2, "sending")], MessageStatus.SENDING),
        ([part(1, 2, "failed")], MessageStatus.SENDING),
        ([part(1, 2, "failed"), part(2, 2, "failed")], MessageStatus.FAILED),
        ([part(2, 3, "failed"), part(3, 3, "sending")], MessageStatus.SENDING),
    ],
)
def test_aggregate_parts_cases(
    reports: list[PartReport], expected: MessageStatus
) -> None:
    assert aggregate_parts(reports)[0] == expected


def test_aggregate_parts_failed_part_went_out() -> None:
    status, error = aggregate_parts([part(1, 2, "failed")], went_out=True)

    assert status == MessageStatus.FAILED
    assert error == "part 1/2: E"


def test_aggregate_parts_names_failed_part() -> None:
    status, error = aggregate_parts([part(1, 3, "sent"), part(3, 3, "failed")])

    assert status == MessageStatus.FAILED
    assert error == "part 3/3: E"


async def test_failed_report_queues_retry(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device)
    await push_task(redis, redis_keys, device, message)

    async with open_socket(hub_url, device.api_key) as socket:
        await receive_type(socket, "task")
        ack = await report(
            socket, message.id, status="failed", error="NO_SERVICE", attempt=1
        )
        late = await report(socket, message.id, status="sending", attempt=1)

    row = await load_message(session_factory, message.id)
    assert ack["status"] == "pending"
    assert late["status"] == "pending"
    assert row.status == MessageStatus.PENDING
    assert row.error == "NO_SERVICE"
    assert row.next_attempt_at is not None
    assert row.sent_at is None
    assert await event_names(session_factory, message.id) == []
    assert await queued_attempts(redis, redis_keys, device) == []
    attempts = await attempt_rows(session_factory, message.id)
    assert [(item.status, item.error) for item in attempts] == [
        (AttemptStatus.FAILED, "NO_SERVICE")
    ]


async def test_report_on_ended_attempt_ignored(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device, attempts=2)

    async with open_socket(hub_url, device.api_key) as socket:
        stale = await report(socket, message.id, status="failed", attempt=1)
        current = await report(socket, message.id, status="sent", attempt=2)

    row = await load_message(session_factory, message.id)
    assert stale["status"] == "assigned"
    assert current["status"] == "sent"
    assert row.status == MessageStatus.SENT


async def test_report_on_future_attempt_keeps_task(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)
    await push_task(redis, redis_keys, device, message)

    async with open_socket(hub_url, device.api_key) as socket:
        await receive_type(socket, "task")
        ack = await report(socket, message.id, status="sending", attempt=2)

    row = await load_message(session_factory, message.id)
    assert ack["status"] == "assigned"
    assert ack["attempt"] == 1
    assert row.status == MessageStatus.ASSIGNED
    # Attempt 1 has not ended, so its task is still offered on the next connection.
    assert await queued_attempts(redis, redis_keys, device) == [1]


async def test_retry_reaches_same_connection(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)
    await push_task(redis, redis_keys, device, message)

    async with open_socket(hub_url, device.api_key) as socket:
        first = await receive_type(socket, "task")
        await report(socket, message.id, status="failed", attempt=1)
        # What the dispatcher does once the retry delay has passed.
        async with session_factory() as db:
            await db.execute(
                update(SMSMessage)
                .where(SMSMessage.id == message.id)
                .values(status=MessageStatus.ASSIGNED.value, attempts=2)
            )
            await db.commit()
        retried = await load_message(session_factory, message.id)
        await push_task(redis, redis_keys, device, retried)
        second = await receive_type(socket, "task")

    assert first["attempt"] == 1
    assert second["attempt"] == 2
    assert second["message_id"] == str(message.id)


async def test_parts_aggregate_in_any_order(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device)
    await push_task(redis, redis_keys, device, message)
    steps = [
        (3, "delivered", "sending"),
        (1, "sent", "sending"),
        (2, "sending", "sending"),
        (2, "sent", "sent"),
        (3, "sent", "sent"),
        (1, "delivered", "sent"),
        (2, "delivered", "delivered"),
        (2, "sent", "delivered"),
    ]

    acks = []
    async with open_socket(hub_url, device.api_key) as socket:
        await receive_type(socket, "task")
        for number, status, _ in steps:
            ack = await report(
                socket, message.id, status=status, part=number, parts=3, attempt=1
            )
            acks.append(ack["status"])

    row = await load_message(session_factory, message.id)
    assert acks == [expected for _, _, expected in steps]
    assert row.status == MessageStatus.DELIVERED
    assert await event_names(session_factory, message.id) == [
        "sms_sent",
        "sms_delivered",
    ]
    async with session_factory() as db:
        parts = await db.scalars(
            select(SMSMessagePart.status)
            .where(SMSMessagePart.message_id == message.id)
            .order_by(SMSMessagePart.part)
        )
        assert list(parts) == ["delivered"] * 3
    attempts = await attempt_rows(session_factory, message.id)
    assert attempts[0].parts == 3
    assert attempts[0].status == AttemptStatus.DELIVERED


async def test_failed_part_after_sent_part_is_final(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        await report(socket, message.id, status="sent", part=1, parts=2)
        ack = await report(
            socket, message.id, status="failed", part=2, parts=2, error="NULL_PDU"
        )

    row = await load_message(session_factory, message.id)
    # Part 1 went out, so a retry would send it twice: the message ends here.
    assert ack["status"] == "failed"
    assert row.status == MessageStatus.FAILED
    assert row.error == "part 2/2: NULL_PDU"
    assert await event_names(session_factory, message.id) == ["sms_failed"]


async def part_rows(sessions: Sessions, message_id: uuid.UUID) -> list[tuple[int, str]]:
    async with sessions() as db:
        rows = await db.execute(
            select(SMSMessagePart.part, SMSMessagePart.status)
            .where(SMSMessagePart.message_id == message_id)
            .order_by(SMSMessagePart.part)
        )
        return [tuple(item) for item in rows.all()]


async def test_failed_part_waits_for_other_parts(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device, body="a" * 200)
    await push_task(redis, redis_keys, device, message)
    multipart = {"parts": 2, "attempt": 1}

    async with open_socket(hub_url, device.api_key) as socket:
        await receive_type(socket, "task")
        sending = await report(socket, message.id, status="sending", attempt=1)
        failed = await report(
            socket, message.id, status="failed", part=1, error="GENERIC", **multipart
        )
        waiting = await load_message(session_factory, message.id)
        sent = await report(socket, message.id, status="sent", part=2, **multipart)

    row = await load_message(session_factory, message.id)
    assert sending["status"] == "sending"
    # Part 2 may still go out, so a retry now could send it twice.
    assert failed["status"] == "sending"
    assert waiting.status == MessageStatus.SENDING
    assert waiting.next_attempt_at is None
    assert sent["status"] == "failed"
    assert sent["attempt"] == 1
    assert row.status == MessageStatus.FAILED
    assert row.error == "part 1/2: GENERIC"
    assert row.attempts == 1
    assert row.next_attempt_at is None
    assert row.failed_at is not None
    assert await part_rows(session_factory, message.id) == [
        (1, "failed"),
        (2, "sent"),
    ]
    assert await event_names(session_factory, message.id) == ["sms_failed"]
    assert await queued_attempts(redis, redis_keys, device) == []
    attempts = await attempt_rows(session_factory, message.id)
    assert [(item.status, item.error) for item in attempts] == [
        (AttemptStatus.FAILED, "part 1/2: GENERIC")
    ]


async def test_all_parts_failed_queue_retry(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device, body="a" * 200)
    await push_task(redis, redis_keys, device, message)
    multipart = {"parts": 2, "attempt": 1}

    async with open_socket(hub_url, device.api_key) as socket:
        await receive_type(socket, "task")
        first = await report(
            socket, message.id, status="failed", part=2, error="NO_SERVICE", **multipart
        )
        second = await report(
            socket, message.id, status="failed", part=1, error="GENERIC", **multipart
        )

    row = await load_message(session_factory, message.id)
    assert first["status"] == "sending"
    assert second["status"] == "pending"
    assert row.status == MessageStatus.PENDING
    assert row.error == "part 1/2: GENERIC"
    assert row.next_attempt_at is not None
    assert await event_names(session_factory, message.id) == []
    assert await queued_attempts(redis, redis_keys, device) == []


async def test_whole_failed_with_unreported_part_is_final(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device, body="a" * 200)

    async with open_socket(hub_url, device.api_key) as socket:
        await report(
            socket, message.id, status="failed", part=1, parts=2, error="GENERIC"
        )
        ack = await report(socket, message.id, status="failed", error="GENERIC")

    row = await load_message(session_factory, message.id)
    # No report shows whether part 2 went out, so the failure cannot be retried.
    assert ack["status"] == "failed"
    assert row.status == MessageStatus.FAILED
    assert row.next_attempt_at is None
    assert await event_names(session_factory, message.id) == ["sms_failed"]


@pytest.mark.parametrize(
    "order",
    [("sent", "failed"), ("failed", "sent")],
    ids=["sent_first", "failed_first"],
)
async def test_failed_part_that_went_out_is_final(
    hub_url: str, session_factory: Sessions, order: tuple[str, str]
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device, body="a" * 200)
    multipart = {"part": 1, "parts": 2, "attempt": 1}

    async with open_socket(hub_url, device.api_key) as socket:
        for status in order:
            ack = await report(
                socket, message.id, status=status, error="DELIVERY_FAILED", **multipart
            )

    row = await load_message(session_factory, message.id)
    # A `failed` part that was also reported `sent` failed its delivery after it went
    # out, so a retry would send it twice.
    assert ack["status"] == "failed"
    assert row.status == MessageStatus.FAILED
    assert row.next_attempt_at is None
    assert row.error == "part 1/2: DELIVERY_FAILED"
    assert await event_names(session_factory, message.id) == ["sms_failed"]


async def test_bad_part_fields_rejected(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        alone = await report(socket, message.id, status="sent", part=1)
        beyond = await report(socket, message.id, status="sent", part=3, parts=2)

    assert alone["error"] == "invalid_frame"
    assert beyond["error"] == "invalid_frame"
    assert (await load_message(session_factory, message.id)).status == "assigned"


async def test_whole_failed_after_sent_part_is_final(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        await report(socket, message.id, status="sent", part=1, parts=2)
        ack = await report(socket, message.id, status="failed", error="NO_SERVICE")

    row = await load_message(session_factory, message.id)
    # Part 1 went out, so a retry would send it twice, even when the failure is
    # reported on the whole message.
    assert ack["status"] == "failed"
    assert row.status == MessageStatus.FAILED
    assert row.next_attempt_at is None
    assert await event_names(session_factory, message.id) == ["sms_failed"]


async def test_part_with_other_parts_rejected(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        await report(socket, message.id, status="sent", part=1, parts=2)
        other = await report(socket, message.id, status="delivered", part=1, parts=1)
        second = await report(socket, message.id, status="sent", part=2, parts=3)

    row = await load_message(session_factory, message.id)
    assert other["error"] == "invalid_frame"
    assert other["reason"] == "parts_mismatch"
    assert "'parts' debe ser 2" in other["message"]
    assert second["error"] == "invalid_frame"
    assert row.status == MessageStatus.SENDING
    async with session_factory() as db:
        parts = await db.execute(
            select(SMSMessagePart.part, SMSMessagePart.parts, SMSMessagePart.status)
            .where(SMSMessagePart.message_id == message.id)
            .order_by(SMSMessagePart.part)
        )
        assert [tuple(item) for item in parts] == [(1, 2, "sent")]


async def test_unretryable_failure_is_final(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        await report(socket, message.id, status="sending")
        ack = await report(
            socket, message.id, status="failed", error="interrupted", retryable=False
        )

    assert ack["status"] == "failed"
    assert (await load_message(session_factory, message.id)).status == "failed"


async def test_expired_report_ends_message(
    hub_url: str, settings: Settings, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    past = datetime.now(UTC) - timedelta(seconds=5)
    message = await create_outgoing(session_factory, device, expires_at=past)

    async with open_socket(hub_url, device.api_key) as socket:
        ack = await report(socket, message.id, status="expired", attempt=1)

    row = await load_message(session_factory, message.id)
    assert ack["status"] == "expired"
    assert row.status == MessageStatus.EXPIRED
    assert row.error == "expired"
    assert await event_names(session_factory, message.id) == ["sms_failed"]


@pytest.mark.parametrize("expires", [False, True], ids=["no_expiry", "expiry"])
@pytest.mark.parametrize("by_part", [False, True], ids=["whole", "part"])
async def test_expired_after_sent_changes_nothing(
    hub_url: str, session_factory: Sessions, expires: bool, by_part: bool
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    expires_at = datetime.now(UTC) + timedelta(hours=1) if expires else None
    message = await create_outgoing(session_factory, device, expires_at=expires_at)
    sent: dict[str, Any] = {"part": 1, "parts": 2} if by_part else {}

    async with open_socket(hub_url, device.api_key) as socket:
        first = await report(socket, message.id, status="sent", **sent)
        ack = await report(socket, message.id, status="expired")

    row = await load_message(session_factory, message.id)
    # `expired` means that the phone skipped the task, which contradicts `sent`.
    assert ack["status"] == first["status"]
    assert row.status == first["status"]
    assert row.error is None
    assert row.failed_at is None
    assert "sms_failed" not in await event_names(session_factory, message.id)


async def test_expired_task_never_pushed(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)
    past = datetime.now(UTC) - timedelta(seconds=5)
    expired = await create_outgoing(session_factory, device, expires_at=past)
    valid = await create_outgoing(session_factory, device)
    await push_task(redis, redis_keys, device, expired)
    await push_task(redis, redis_keys, device, valid)

    async with open_socket(hub_url, device.api_key) as socket:
        task = await receive_type(socket, "task")
        pong = await request(socket, {"type": "ping"})

    assert task["message_id"] == str(valid.id)
    assert pong["type"] == "pong"
    await asyncio.sleep(0.1)
    assert await queued_attempts(redis, redis_keys, device) == [1]


def test_new_attempt_is_pushed_again() -> None:
    message_id = uuid.uuid4()
    state = ConnectionState(uuid.uuid4(), "c", 0.0, 0.0, 0.0)
    first = TaskEntry(b"1-0", message_id, {"type": "task", "attempt": 1})
    repeat = TaskEntry(b"2-0", message_id, {"type": "task", "attempt": 1})
    retry = TaskEntry(b"3-0", message_id, {"type": "task", "attempt": 2})

    assert state.mark_pushed(first)
    assert state.select_unpushed([repeat, retry]) == [retry]
    assert not state.mark_pushed(repeat)
    assert state.mark_pushed(retry)


async def test_moved_task_report_changes_nothing(
    hub_url: str, session_factory: Sessions
) -> None:
    first = await create_device(session_factory)
    second = await create_device(session_factory, user_id=first.user_id)
    message = await create_outgoing(session_factory, second, attempts=2)
    async with session_factory() as db:
        db.add_all(
            [
                SMSMessageAttempt(
                    message_id=message.id,
                    attempt_number=1,
                    device_id=first.device_id,
                    status=AttemptStatus.MOVED.value,
                ),
                SMSMessageAttempt(
                    message_id=message.id,
                    attempt_number=2,
                    device_id=second.device_id,
                    status=AttemptStatus.ASSIGNED.value,
                ),
            ]
        )
        await db.commit()

    async with open_socket(hub_url, first.api_key) as socket:
        ack = await report(socket, message.id, status="sending", attempt=1)

    row = await load_message(session_factory, message.id)
    assert ack["type"] == "ack"
    assert ack["status"] == "assigned"
    assert ack["attempt"] == 2
    assert row.status == MessageStatus.ASSIGNED
    assert row.device_id == second.device_id


async def event_bodies(sessions: Sessions, message_id: uuid.UUID) -> dict[str, Any]:
    """Return the parsed webhook event bodies of a message, by event name."""
    async with sessions() as db:
        rows = await db.execute(
            select(WebhookEvent.event, WebhookEvent.body).where(
                WebhookEvent.message_id == message_id
            )
        )
        return {event: jsonutil.loads(body) for event, body in rows.all()}


PREVIOUS_ERROR = "RESULT_ERROR_GENERIC_FAILURE"


async def create_retried_message(
    sessions: Sessions, failed_on: DeviceRecord, retried_on: DeviceRecord
) -> SMSMessage:
    """Create a message whose first attempt failed on `failed_on` and whose second is
    assigned to `retried_on`, with the first attempt's error still in `error`."""
    message = await create_outgoing(
        sessions, retried_on, attempts=2, error=PREVIOUS_ERROR
    )
    async with sessions() as db:
        db.add_all(
            [
                SMSMessageAttempt(
                    message_id=message.id,
                    attempt_number=1,
                    device_id=failed_on.device_id,
                    status=AttemptStatus.FAILED.value,
                    error=PREVIOUS_ERROR,
                ),
                SMSMessageAttempt(
                    message_id=message.id,
                    attempt_number=2,
                    device_id=retried_on.device_id,
                    status=AttemptStatus.ASSIGNED.value,
                ),
            ]
        )
        await db.commit()
    return message


@pytest.mark.parametrize("by_part", [False, True], ids=["whole", "part"])
async def test_retry_reports_clear_previous_error(
    hub_url: str, session_factory: Sessions, by_part: bool
) -> None:
    failing = await create_device(session_factory)
    good = await create_device(session_factory, user_id=failing.user_id)
    await subscribe_to_all(session_factory, good)
    message = await create_retried_message(session_factory, failing, good)
    part_fields = {"part": 1, "parts": 1} if by_part else {}

    async with open_socket(hub_url, good.api_key) as socket:
        sending = await report(
            socket, message.id, status="sending", attempt=2, **part_fields
        )
        after_sending = await load_message(session_factory, message.id)
        await report(socket, message.id, status="sent", attempt=2, **part_fields)
        await report(socket, message.id, status="delivered", attempt=2, **part_fields)

    row = await load_message(session_factory, message.id)
    bodies = await event_bodies(session_factory, message.id)
    attempts = await attempt_rows(session_factory, message.id)
    assert sending["status"] == "sending"
    assert after_sending.error is None
    assert row.status == MessageStatus.DELIVERED
    assert row.error is None
    assert sorted(bodies) == ["sms_delivered", "sms_sent"]
    assert "error" not in bodies["sms_sent"]
    assert "error" not in bodies["sms_delivered"]
    assert [(item.status, item.error) for item in attempts] == [
        (AttemptStatus.FAILED, PREVIOUS_ERROR),
        (AttemptStatus.DELIVERED, None),
    ]


@pytest.mark.parametrize("by_part", [False, True], ids=["whole", "part"])
async def test_sent_message_stores_device_number(
    hub_url: str, session_factory: Sessions, by_part: bool
) -> None:
    device = await create_device(session_factory, phone_number="+525512345678")
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device)
    part_fields = {"part": 1, "parts": 1} if by_part else {}

    async with open_socket(hub_url, device.api_key) as socket:
        await report(socket, message.id, status="sent", attempt=1, **part_fields)

    row = await load_message(session_factory, message.id)
    bodies = await event_bodies(session_factory, message.id)
    assert row.from_number == "+525512345678"
    assert bodies["sms_sent"]["from"] == "+525512345678"


async def test_sent_message_keeps_assigned_number(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory, phone_number="+525512345678")
    await subscribe_to_all(session_factory, device)
    # The number the dispatcher stored at assignment, before the device's number changed.
    message = await create_outgoing(
        session_factory, device, from_number="+525500000001"
    )

    async with open_socket(hub_url, device.api_key) as socket:
        await report(socket, message.id, status="sent", attempt=1)

    row = await load_message(session_factory, message.id)
    bodies = await event_bodies(session_factory, message.id)
    assert row.from_number == "+525500000001"
    assert bodies["sms_sent"]["from"] == "+525500000001"


async def test_sent_message_without_device_number(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        await report(socket, message.id, status="sent", attempt=1)

    row = await load_message(session_factory, message.id)
    bodies = await event_bodies(session_factory, message.id)
    assert row.from_number is None
    assert bodies["sms_sent"]["from"] is None


async def charge_quota(sessions: Sessions, device: DeviceRecord) -> None:
    """Give the device's user a free-plan quota row with one SMS charged."""
    async with sessions() as db:
        plan_id = await db.scalar(select(UserPlan.id).where(UserPlan.code == "free"))
        db.add(
            UserQuota(user_id=device.user_id, plan_id=plan_id, sms_sent_this_month=1)
        )
        await db.commit()


async def charged_sms(sessions: Sessions, device: DeviceRecord) -> int | None:
    async with sessions() as db:
        return await db.scalar(
            select(UserQuota.sms_sent_this_month).where(
                UserQuota.user_id == device.user_id
            )
        )


@pytest.mark.parametrize("late", ["sent", "delivered"])
async def test_late_part_cancels_queued_retry(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    late: str,
) -> None:
    device = await create_device(session_factory, phone_number="+525512345678")
    await subscribe_to_all(session_factory, device)
    await charge_quota(session_factory, device)
    message = await create_outgoing(
        session_factory, device, body="a" * 200, from_number="+525512345678"
    )
    await push_task(redis, redis_keys, device, message)
    multipart = {"parts": 2, "attempt": 1}

    async with open_socket(hub_url, device.api_key) as socket:
        await receive_type(socket, "task")
        await report(socket, message.id, status="sending", attempt=1)
        await report(
            socket, message.id, status="failed", part=1, error="GENERIC", **multipart
        )
        retry = await report(
            socket, message.id, status="failed", part=2, error="GENERIC", **multipart
        )
        first = await report(socket, message.id, status=late, part=1, **multipart)
        second = await report(
            socket, message.id, status="delivered", part=1, **multipart
        )

    row = await load_message(session_factory, message.id)
    bodies = await event_bodies(session_factory, message.id)
    attempts = await attempt_rows(session_factory, message.id)
    assert retry["status"] == "pending"
    # Part 1 went out, so the queued retry would send it twice.
    assert first["status"] == "failed"
    assert first["attempt"] == 1
    assert second["status"] == "failed"
    assert row.status == MessageStatus.FAILED
    assert row.error == "part 1/2: GENERIC"
    assert row.attempts == 1
    assert row.next_attempt_at is None
    assert row.failed_at is not None
    assert row.from_number == "+525512345678"
    assert row.quota_refunded_at is None
    assert await charged_sms(session_factory, device) == 1
    assert await event_names(session_factory, message.id) == ["sms_failed"]
    assert bodies["sms_failed"]["error"] == "part 1/2: GENERIC"
    assert bodies["sms_failed"]["from"] == "+525512345678"
    # Forward-only: a `failed` part stays `failed`, and its late report only ends the
    # retry.
    assert await part_rows(session_factory, message.id) == [
        (1, "failed"),
        (2, "failed"),
    ]
    assert [(item.status, item.error) for item in attempts] == [
        (AttemptStatus.FAILED, "part 1/2: GENERIC")
    ]
    assert await queued_attempts(redis, redis_keys, device) == []


async def test_late_part_after_whole_failure_is_final(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device, body="a" * 200)

    async with open_socket(hub_url, device.api_key) as socket:
        retry = await report(
            socket, message.id, status="failed", error="NO_SERVICE", attempt=1
        )
        late = await report(socket, message.id, status="sent", part=2, parts=2)

    row = await load_message(session_factory, message.id)
    assert retry["status"] == "pending"
    assert late["status"] == "failed"
    assert row.status == MessageStatus.FAILED
    assert row.error == "NO_SERVICE"
    assert row.next_attempt_at is None
    assert await part_rows(session_factory, message.id) == [(2, "sent")]
    assert await event_names(session_factory, message.id) == ["sms_failed"]


@pytest.mark.parametrize("same_device", [False, True], ids=["other", "same"])
async def test_late_part_cancels_unclaimed_retry(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    same_device: bool,
) -> None:
    failed_on = await create_device(session_factory, phone_number="+525512345678")
    retried_on = (
        failed_on
        if same_device
        else await create_device(session_factory, user_id=failed_on.user_id)
    )
    await subscribe_to_all(session_factory, failed_on)
    message = await create_retried_message(session_factory, failed_on, retried_on)
    await push_task(redis, redis_keys, retried_on, message)

    async with open_socket(hub_url, failed_on.api_key) as socket:
        late = await report(
            socket, message.id, status="sent", part=1, parts=2, attempt=1
        )
    async with open_socket(hub_url, retried_on.api_key) as socket:
        claim = await report(socket, message.id, status="sending", attempt=2)

    row = await load_message(session_factory, message.id)
    attempts = await attempt_rows(session_factory, message.id)
    assert late["status"] == "failed"
    assert late["attempt"] == 2
    # The `ack` of the retry phone's claim names `failed`, so that phone does not send.
    assert claim["status"] == "failed"
    assert row.status == MessageStatus.FAILED
    assert row.error == PREVIOUS_ERROR
    assert row.from_number == "+525512345678"
    assert await part_rows(session_factory, message.id) == [(1, "sent")]
    assert [(item.status, item.error) for item in attempts] == [
        (AttemptStatus.FAILED, PREVIOUS_ERROR),
        (AttemptStatus.FAILED, "earlier_part_went_out"),
    ]
    assert await event_names(session_factory, message.id) == ["sms_failed"]
    assert await queued_attempts(redis, redis_keys, retried_on) == []


async def test_late_part_after_claimed_retry_recorded(
    hub_url: str, session_factory: Sessions
) -> None:
    failed_on = await create_device(session_factory)
    retried_on = await create_device(session_factory, user_id=failed_on.user_id)
    await subscribe_to_all(session_factory, failed_on)
    message = await create_retried_message(session_factory, failed_on, retried_on)

    async with open_socket(hub_url, retried_on.api_key) as socket:
        claim = await report(socket, message.id, status="sending", attempt=2)
    async with open_socket(hub_url, failed_on.api_key) as socket:
        late = await report(
            socket, message.id, status="sent", part=1, parts=2, attempt=1
        )

    row = await load_message(session_factory, message.id)
    attempts = await attempt_rows(session_factory, message.id)
    assert claim["status"] == "sending"
    # The retry's phone may have sent already, so its own reports decide the message.
    assert late["status"] == "sending"
    assert late["attempt"] == 2
    assert row.status == MessageStatus.SENDING
    assert await part_rows(session_factory, message.id) == [(1, "sent")]
    assert [item.status for item in attempts] == [
        AttemptStatus.FAILED,
        AttemptStatus.SENDING,
    ]
    assert await event_names(session_factory, message.id) == []


@pytest.mark.parametrize("late", ["sent", "delivered"])
async def test_late_whole_report_cancels_queued_retry(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    late: str,
) -> None:
    device = await create_device(session_factory, phone_number="+525512345678")
    await subscribe_to_all(session_factory, device)
    await charge_quota(session_factory, device)
    message = await create_outgoing(
        session_factory, device, from_number="+525512345678"
    )
    await push_task(redis, redis_keys, device, message)

    async with open_socket(hub_url, device.api_key) as socket:
        await receive_type(socket, "task")
        await report(socket, message.id, status="sending", attempt=1)
        retry = await report(
            socket, message.id, status="failed", error="NO_SERVICE", attempt=1
        )
        outcome = await report(socket, message.id, status=late, attempt=1)
        repeated = await report(socket, message.id, status=late, attempt=1)

    row = await load_message(session_factory, message.id)
    bodies = await event_bodies(session_factory, message.id)
    attempts = await attempt_rows(session_factory, message.id)
    event = f"sms_{late}"
    assert retry["status"] == "pending"
    # The SMS went out, so the queued retry would send it twice.
    assert outcome["status"] == late
    assert outcome["attempt"] == 1
    assert repeated["status"] == late
    assert row.status == MessageStatus(late)
    assert row.error is None
    assert row.attempts == 1
    assert row.next_attempt_at is None
    assert row.failed_at is None
    assert row.sent_at is not None
    if late == "sent":
        assert row.delivered_at is None
    else:
        assert row.delivered_at is not None
    assert row.device_id == device.device_id
    assert row.from_number == "+525512345678"
    assert row.quota_refunded_at is None
    assert await charged_sms(session_factory, device) == 1
    # A message never reported `sent` gets `sms_sent` with its `sms_delivered`.
    assert sorted(await event_names(session_factory, message.id)) == sorted(
        {"sms_sent", event}
    )
    assert bodies[event]["from"] == "+525512345678"
    assert "error" not in bodies[event]
    assert bodies["sms_sent"]["status"] == "sent"
    # The attempt keeps the error of its `failed` report.
    assert [(item.status, item.error) for item in attempts] == [
        (AttemptStatus(late), "NO_SERVICE")
    ]
    assert (attempts[0].ended_at is not None) == (late == "delivered")
    assert await queued_attempts(redis, redis_keys, device) == []


async def test_late_whole_report_without_attempt(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        retry = await report(socket, message.id, status="failed", error="NO_SERVICE")
        # Without `attempt` a report applies to the current attempt, which is the
        # failed one while its retry waits.
        late = await report(socket, message.id, status="sent")
        delivered = await report(socket, message.id, status="delivered")

    row = await load_message(session_factory, message.id)
    attempts = await attempt_rows(session_factory, message.id)
    assert retry["status"] == "pending"
    assert late["status"] == "sent"
    assert delivered["status"] == "delivered"
    assert row.status == MessageStatus.DELIVERED
    assert row.next_attempt_at is None
    assert await event_names(session_factory, message.id) == [
        "sms_sent",
        "sms_delivered",
    ]
    assert [item.status for item in attempts] == [AttemptStatus.DELIVERED]


@pytest.mark.parametrize("same_device", [False, True], ids=["other", "same"])
async def test_late_whole_report_cancels_unclaimed_retry(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    same_device: bool,
) -> None:
    failed_on = await create_device(session_factory, phone_number="+525512345678")
    retried_on = (
        failed_on
        if same_device
        else await create_device(
            session_factory, user_id=failed_on.user_id, phone_number="+525587654321"
        )
    )
    await subscribe_to_all(session_factory, failed_on)
    message = await create_retried_message(session_factory, failed_on, retried_on)
    await push_task(redis, redis_keys, retried_on, message)

    async with open_socket(hub_url, failed_on.api_key) as socket:
        late = await report(socket, message.id, status="sent", attempt=1)
    async with open_socket(hub_url, retried_on.api_key) as socket:
        claim = await report(socket, message.id, status="sending", attempt=2)
    async with open_socket(hub_url, failed_on.api_key) as socket:
        delivered = await report(socket, message.id, status="delivered", attempt=1)

    row = await load_message(session_factory, message.id)
    bodies = await event_bodies(session_factory, message.id)
    attempts = await attempt_rows(session_factory, message.id)
    assert late["status"] == "sent"
    assert late["attempt"] == 2
    # The `ack` of the retry phone's claim does not name `sending`, so that phone does
    # not send.
    assert claim["status"] == "sent"
    assert delivered["status"] == "delivered"
    assert row.status == MessageStatus.DELIVERED
    assert row.error is None
    assert row.device_id == failed_on.device_id
    assert row.from_number == "+525512345678"
    assert row.sent_at is not None
    assert row.delivered_at is not None
    assert [(item.status, item.error) for item in attempts] == [
        (AttemptStatus.DELIVERED, PREVIOUS_ERROR),
        (AttemptStatus.FAILED, "earlier_attempt_went_out"),
    ]
    assert await event_names(session_factory, message.id) == [
        "sms_sent",
        "sms_delivered",
    ]
    assert bodies["sms_sent"]["from"] == "+525512345678"
    assert bodies["sms_sent"]["device_id"] == str(failed_on.device_id)
    assert await queued_attempts(redis, redis_keys, retried_on) == []


@pytest.mark.parametrize("same_device", [False, True], ids=["other", "same"])
async def test_delivered_without_attempt_after_late_sent(
    hub_url: str, session_factory: Sessions, same_device: bool
) -> None:
    failed_on = await create_device(session_factory)
    retried_on = (
        failed_on
        if same_device
        else await create_device(session_factory, user_id=failed_on.user_id)
    )
    await subscribe_to_all(session_factory, failed_on)
    message = await create_retried_message(session_factory, failed_on, retried_on)

    async with open_socket(hub_url, failed_on.api_key) as socket:
        late = await report(socket, message.id, status="sent", attempt=1)
        # The current attempt is the cancelled retry, but this report belongs to the
        # attempt whose SMS went out.
        delivered = await report(socket, message.id, status="delivered")

    row = await load_message(session_factory, message.id)
    attempts = await attempt_rows(session_factory, message.id)
    assert late["status"] == "sent"
    assert delivered["status"] == "delivered"
    assert delivered["attempt"] == 2
    assert row.status == MessageStatus.DELIVERED
    assert row.device_id == failed_on.device_id
    assert row.delivered_at is not None
    assert [(item.status, item.error) for item in attempts] == [
        (AttemptStatus.DELIVERED, PREVIOUS_ERROR),
        (AttemptStatus.FAILED, "earlier_attempt_went_out"),
    ]
    assert attempts[0].ended_at is not None
    assert await event_names(session_factory, message.id) == [
        "sms_sent",
        "sms_delivered",
    ]


@pytest.mark.parametrize("same_device", [False, True], ids=["other", "same"])
@pytest.mark.parametrize("with_attempt", [True, False], ids=["attempt", "no_attempt"])
async def test_failed_after_late_sent_ends_message(
    hub_url: str, session_factory: Sessions, with_attempt: bool, same_device: bool
) -> None:
    failed_on = await create_device(session_factory, phone_number="+525512345678")
    retried_on = (
        failed_on
        if same_device
        else await create_device(
            session_factory, user_id=failed_on.user_id, phone_number="+525587654321"
        )
    )
    await subscribe_to_all(session_factory, failed_on)
    await charge_quota(session_factory, failed_on)
    message = await create_retried_message(session_factory, failed_on, retried_on)
    attempt_field = {"attempt": 1} if with_attempt else {}

    async with open_socket(hub_url, failed_on.api_key) as socket:
        late = await report(socket, message.id, status="sent", attempt=1)
        # The phone reports a delivery failure of the attempt whose SMS went out.
        failed = await report(
            socket, message.id, status="failed", error="STATUS_FAILED", **attempt_field
        )

    row = await load_message(session_factory, message.id)
    bodies = await event_bodies(session_factory, message.id)
    attempts = await attempt_rows(session_factory, message.id)
    assert late["status"] == "sent"
    assert failed["status"] == "failed"
    assert failed["attempt"] == 2
    assert row.status == MessageStatus.FAILED
    assert row.error == "STATUS_FAILED"
    assert row.sent_at is not None
    assert row.failed_at is not None
    assert row.next_attempt_at is None
    assert row.device_id == failed_on.device_id
    assert row.from_number == "+525512345678"
    # The SMS went out, so the quota charge stays.
    assert row.quota_refunded_at is None
    assert await charged_sms(session_factory, failed_on) == 1
    assert [(item.status, item.error) for item in attempts] == [
        (AttemptStatus.FAILED, "STATUS_FAILED"),
        (AttemptStatus.FAILED, "earlier_attempt_went_out"),
    ]
    assert attempts[0].ended_at is not None
    assert await event_names(session_factory, message.id) == [
        "sms_sent",
        "sms_failed",
    ]
    assert bodies["sms_failed"]["error"] == "STATUS_FAILED"
    assert bodies["sms_failed"]["from"] == "+525512345678"
    assert bodies["sms_failed"]["device_id"] == str(failed_on.device_id)


async def test_late_whole_report_after_claimed_retry_ignored(
    hub_url: str, session_factory: Sessions
) -> None:
    failed_on = await create_device(session_factory)
    retried_on = await create_device(session_factory, user_id=failed_on.user_id)
    await subscribe_to_all(session_factory, failed_on)
    message = await create_retried_message(session_factory, failed_on, retried_on)

    async with open_socket(hub_url, retried_on.api_key) as socket:
        claim = await report(socket, message.id, status="sending", attempt=2)
    async with open_socket(hub_url, failed_on.api_key) as socket:
        late = await report(socket, message.id, status="sent", attempt=1)

    row = await load_message(session_factory, message.id)
    attempts = await attempt_rows(session_factory, message.id)
    assert claim["status"] == "sending"
    # The retry's phone may have sent already, so its own reports decide the message.
    assert late["status"] == "sending"
    assert late["attempt"] == 2
    assert row.status == MessageStatus.SENDING
    assert row.device_id == retried_on.device_id
    assert row.sent_at is None
    assert [item.status for item in attempts] == [
        AttemptStatus.FAILED,
        AttemptStatus.SENDING,
    ]
    assert await event_names(session_factory, message.id) == []


async def test_late_whole_report_after_final_failure_ignored(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device)
    message = await create_outgoing(session_factory, device)

    async with open_socket(hub_url, device.api_key) as socket:
        failed = await report(
            socket,
            message.id,
            status="failed",
            error="interrupted",
            retryable=False,
            attempt=1,
        )
        late = await report(socket, message.id, status="sent", attempt=1)

    row = await load_message(session_factory, message.id)
    attempts = await attempt_rows(session_factory, message.id)
    assert failed["status"] == "failed"
    assert late["status"] == "failed"
    assert row.status == MessageStatus.FAILED
    assert row.sent_at is None
    assert [item.status for item in attempts] == [AttemptStatus.FAILED]
    assert await event_names(session_factory, message.id) == ["sms_failed"]
