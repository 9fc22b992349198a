"""Cancelling a message, or the messages of a bulk send, that no phone has claimed."""

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from api_test_helpers import ApiUser, MakeUser, register_device, send_sms
from httpx import AsyncClient
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.bulk import service as bulk_service
from mensajero_common import jsonutil, message_attempts, protocol, queues
from mensajero_common.keys import RedisKeys
from mensajero_common.models import (
    AttemptStatus,
    MessageStatus,
    MessageType,
    SMSMessage,
    SMSMessageAttempt,
    UserQuota,
    WebhookConfig,
    WebhookDelivery,
    WebhookEvent,
)
from mensajero_common.webhooks import EVENT_SMS_FAILED

SessionFactory = async_sessionmaker[AsyncSession]

MESSAGES_URL = "/api/v1/sms/messages"
BULK_URL = "/api/v1/sms/send-bulk"
PROGRESS_URL = "/api/v1/sms/bulk"


def _cancel_url(message_id: uuid.UUID | str) -> str:
    return f"{MESSAGES_URL}/{message_id}/cancel"


async def _subscribe(session_factory: SessionFactory, owner: ApiUser) -> None:
    async with session_factory() as session:
        session.add(
            WebhookConfig(
                user_id=owner.id,
                url="http://127.0.0.1:9/hook",
                secret_key="whsec_dGVzdC1zZWNyZXQtMTIzNA==",
                events=[EVENT_SMS_FAILED],
            )
        )
        await session.commit()


async def _send(client: AsyncClient, owner: ApiUser, **fields: Any) -> uuid.UUID:
    response = await send_sms(client, owner, **fields)
    assert response.status_code == 201, response.text
    return uuid.UUID(response.json()["data"]["message_id"])


async def _sms_sent(session_factory: SessionFactory, owner: ApiUser) -> int:
    async with session_factory() as session:
        used = await session.scalar(
            select(UserQuota.sms_sent_this_month).where(UserQuota.user_id == owner.id)
        )
    assert used is not None
    return used


async def _load(session_factory: SessionFactory, message_id: uuid.UUID) -> SMSMessage:
    async with session_factory() as session:
        message = await session.get(SMSMessage, message_id)
    assert message is not None
    return message


async def _set_status(
    session_factory: SessionFactory, message_id: uuid.UUID, **values: Any
) -> None:
    async with session_factory() as session:
        await session.execute(
            update(SMSMessage).where(SMSMessage.id == message_id).values(**values)
        )
        await session.commit()


async def _assign(
    session_factory: SessionFactory,
    redis: Redis,
    redis_keys: RedisKeys,
    message_id: uuid.UUID,
    device_id: uuid.UUID,
) -> None:
    """Assign the message to the device and queue its task, as the dispatcher does."""
    async with session_factory() as session:
        await session.execute(
            update(SMSMessage)
            .where(SMSMessage.id == message_id)
            .values(
                status=MessageStatus.ASSIGNED,
                device_id=device_id,
                from_number="+34600000099",
                attempts=1,
                assigned_at=datetime.now(UTC),
            )
        )
        await message_attempts.start_attempts(session, [(message_id, 1, device_id)])
        await session.commit()
    message = await _load(session_factory, message_id)
    task = protocol.task_frame(
        message.id,
        message.to_number or "",
        message.body,
        segments=message.segments,
        encoding=message.encoding,
        created_at=message.created_at,
        attempt=1,
    )
    await queues.push_device_task(redis, redis_keys, device_id, message.id, task)


async def _attempts(
    session_factory: SessionFactory, message_id: uuid.UUID
) -> list[SMSMessageAttempt]:
    async with session_factory() as session:
        rows = await session.scalars(
            select(SMSMessageAttempt)
            .where(SMSMessageAttempt.message_id == message_id)
            .order_by(SMSMessageAttempt.attempt_number)
        )
        return list(rows)


async def _failed_events(
    session_factory: SessionFactory, message_id: uuid.UUID
) -> list[dict[str, Any]]:
    async with session_factory() as session:
        rows = await session.scalars(
            select(WebhookEvent.body).where(
                WebhookEvent.message_id == message_id,
                WebhookEvent.event == EVENT_SMS_FAILED,
            )
        )
        return [jsonutil.loads(body) for body in rows]


async def _deliveries(session_factory: SessionFactory, owner: ApiUser) -> int:
    async with session_factory() as session:
        rows = await session.scalars(
            select(WebhookDelivery.id).where(WebhookDelivery.user_id == owner.id)
        )
        return len(list(rows))


async def _queued_tasks(
    redis: Redis, redis_keys: RedisKeys, device_id: uuid.UUID
) -> list[str]:
    entries = await redis.xrange(redis_keys.device_tasks_stream(device_id))
    return [fields[b"message_id"].decode() for _, fields in entries]


async def test_cancel_pending_message(
    client: AsyncClient,
    user: ApiUser,
    session_factory: SessionFactory,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    await _subscribe(session_factory, user)
    message_id = await _send(client, user)
    assert await _sms_sent(session_factory, user) == 1

    response = await client.post(
        _cancel_url(message_id), headers={**user.headers, "Accept-Language": "en"}
    )
    read = await client.get(f"{MESSAGES_URL}/{message_id}", headers=user.headers)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["message"] == "Message cancelled: it will not be sent."
    assert body["data"] == read.json()["data"]
    assert body["data"]["status"] == "failed"
    assert body["data"]["error"] == "cancelled"
    assert body["data"]["failed_at"] is not None
    assert body["data"]["from"] is None
    assert await _sms_sent(session_factory, user) == 0
    row = await _load(session_factory, message_id)
    assert row.quota_refunded_at is not None
    assert row.next_attempt_at is None

    events = await _failed_events(session_factory, message_id)
    assert len(events) == 1
    assert events[0]["status"] == "failed"
    assert events[0]["error"] == "cancelled"
    assert await _deliveries(session_factory, user) == 1
    assert await redis.zcard(redis_keys.arq_queue) == 1


async def test_cancel_waiting_retry(
    client: AsyncClient, user: ApiUser, session_factory: SessionFactory
) -> None:
    message_id = await _send(client, user)
    # Waiting for its second attempt after a failure that sent nothing.
    await _set_status(
        session_factory,
        message_id,
        attempts=1,
        error="NO_SERVICE",
        next_attempt_at=datetime.now(UTC),
    )

    response = await client.post(_cancel_url(message_id), headers=user.headers)

    assert response.status_code == 200, response.text
    assert response.json()["data"]["error"] == "cancelled"
    row = await _load(session_factory, message_id)
    assert row.status == MessageStatus.FAILED
    assert row.next_attempt_at is None
    assert await _sms_sent(session_factory, user) == 0


async def test_cancel_assigned_message(
    client: AsyncClient,
    user: ApiUser,
    session_factory: SessionFactory,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    await _subscribe(session_factory, user)
    device = await register_device(client, user)
    device_id = uuid.UUID(device["id"])
    message_id = await _send(client, user, device_id=device["id"])
    other_id = await _send(client, user, to="+525512340000", device_id=device["id"])
    await _assign(session_factory, redis, redis_keys, message_id, device_id)
    await _assign(session_factory, redis, redis_keys, other_id, device_id)

    response = await client.post(_cancel_url(message_id), headers=user.headers)

    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["status"] == "failed"
    assert data["error"] == "cancelled"
    assert data["device_id"] == str(device_id)
    # No phone started sending it, so it has no sender, as after an expiry.
    assert data["from"] is None
    assert await _sms_sent(session_factory, user) == 1
    attempts = await _attempts(session_factory, message_id)
    assert [(item.status, item.error) for item in attempts] == [
        (AttemptStatus.FAILED, "cancelled")
    ]
    assert attempts[0].ended_at is not None
    assert attempts[0].acknowledged_at is None
    # The other message's task stays for its phone.
    assert await _queued_tasks(redis, redis_keys, device_id) == [str(other_id)]
    assert len(await _failed_events(session_factory, message_id)) == 1


@pytest.mark.parametrize(
    "status",
    [
        MessageStatus.SENDING,
        MessageStatus.SENT,
        MessageStatus.DELIVERED,
        MessageStatus.FAILED,
        MessageStatus.EXPIRED,
    ],
)
async def test_cancel_claimed_or_ended_conflicts(
    client: AsyncClient,
    user: ApiUser,
    session_factory: SessionFactory,
    status: MessageStatus,
) -> None:
    await _subscribe(session_factory, user)
    message_id = await _send(client, user)
    await _set_status(session_factory, message_id, status=status, error="NO_SERVICE")
    before = await _load(session_factory, message_id)

    spanish = await client.post(
        _cancel_url(message_id), headers={**user.headers, "Accept-Language": "es"}
    )
    english = await client.post(
        _cancel_url(message_id), headers={**user.headers, "Accept-Language": "en"}
    )

    assert spanish.status_code == 409
    assert spanish.json()["error"] == "message_not_cancellable"
    assert spanish.json()["status"] == status.value
    assert spanish.json()["message_id"] == str(message_id)
    assert spanish.headers["Content-Language"] == "es"
    assert f"estado '{status.value}'" in spanish.json()["message"]
    assert english.status_code == 409
    assert english.headers["Content-Language"] == "en"
    assert f"is '{status.value}'" in english.json()["message"]
    after = await _load(session_factory, message_id)
    assert after.status == before.status
    assert after.error == "NO_SERVICE"
    assert after.updated_at == before.updated_at
    assert await _sms_sent(session_factory, user) == 1
    assert await _failed_events(session_factory, message_id) == []


async def test_cancel_incoming_conflicts(
    client: AsyncClient, user: ApiUser, session_factory: SessionFactory
) -> None:
    async with session_factory() as session:
        message = SMSMessage(
            user_id=user.id,
            type=MessageType.INCOMING,
            status=MessageStatus.RECEIVED,
            from_number="+34600000001",
            body="Hola",
            segments=1,
            encoding="gsm7",
        )
        session.add(message)
        await session.commit()

    response = await client.post(_cancel_url(message.id), headers=user.headers)

    assert response.status_code == 409
    assert response.json()["error"] == "message_not_cancellable"
    assert response.json()["status"] == "received"


async def test_cancel_other_users_message(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="pro")
    stranger = await make_user(plan="pro")
    message_id = await _send(client, owner)

    foreign = await client.post(_cancel_url(message_id), headers=stranger.headers)
    unknown = await client.post(_cancel_url(uuid.uuid4()), headers=owner.headers)
    malformed = await client.post(_cancel_url("not-a-uuid"), headers=owner.headers)
    anonymous = await client.post(_cancel_url(message_id))

    assert foreign.status_code == 404
    assert foreign.json()["error"] == "message_not_found"
    assert foreign.json()["message_id"] == str(message_id)
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "message_not_found"
    assert malformed.status_code == 422
    assert anonymous.status_code == 401
    row = await _load(session_factory, message_id)
    assert row.status == MessageStatus.PENDING
    assert await _sms_sent(session_factory, owner) == 1


async def test_cancel_twice_changes_nothing(
    client: AsyncClient,
    user: ApiUser,
    session_factory: SessionFactory,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    await _subscribe(session_factory, user)
    first_id = await _send(client, user)
    await _send(client, user, to="+525512340000")
    assert await _sms_sent(session_factory, user) == 2

    first = await client.post(_cancel_url(first_id), headers=user.headers)
    again = await client.post(_cancel_url(first_id), headers=user.headers)

    assert first.status_code == 200, first.text
    assert again.status_code == 200, again.text
    assert again.json()["data"] == first.json()["data"]
    assert await _sms_sent(session_factory, user) == 1
    assert len(await _failed_events(session_factory, first_id)) == 1
    assert await _deliveries(session_factory, user) == 1
    assert await redis.zcard(redis_keys.arq_queue) == 1


async def _send_bulk(client: AsyncClient, owner: ApiUser, count: int) -> dict[str, Any]:
    numbers = [f"+52551234{n:04d}" for n in range(count)]
    response = await client.post(
        BULK_URL, json={"recipients": numbers, "body": "Hola"}, headers=owner.headers
    )
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def test_bulk_cancel_mixed_statuses(
    client: AsyncClient,
    user: ApiUser,
    session_factory: SessionFactory,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    await _subscribe(session_factory, user)
    device = await register_device(client, user)
    device_id = uuid.UUID(device["id"])
    task = await _send_bulk(client, user, 6)
    ids = [uuid.UUID(value) for value in task["message_ids"]]
    await _assign(session_factory, redis, redis_keys, ids[0], device_id)
    await _assign(session_factory, redis, redis_keys, ids[1], device_id)
    await _set_status(session_factory, ids[1], status=MessageStatus.SENDING)
    await _set_status(session_factory, ids[2], status=MessageStatus.DELIVERED)
    await _set_status(session_factory, ids[3], status=MessageStatus.EXPIRED)
    # ids[4] and ids[5] stay pending.
    assert await _sms_sent(session_factory, user) == 6

    response = await client.post(
        f"{PROGRESS_URL}/{task['task_id']}/cancel",
        headers={**user.headers, "Accept-Language": "en"},
    )
    progress = await client.get(
        f"{PROGRESS_URL}/{task['task_id']}", headers=user.headers
    )

    assert response.status_code == 200, response.text
    body = response.json()
    data = body["data"]
    assert data["cancelled"] == 3
    assert body["message"].startswith("Messages cancelled: 3.")
    assert {key: value for key, value in data.items() if key != "cancelled"} == (
        progress.json()["data"]
    )
    assert data["counts"] == {
        "pending": 0,
        "assigned": 0,
        "sending": 1,
        "sent": 0,
        "delivered": 1,
        "failed": 3,
        "expired": 1,
    }
    # A phone is still sending one of them.
    assert data["status"] == "processing"
    for message_id in (ids[0], ids[4], ids[5]):
        row = await _load(session_factory, message_id)
        assert row.status == MessageStatus.FAILED
        assert row.error == "cancelled"
        assert len(await _failed_events(session_factory, message_id)) == 1
    assert (await _load(session_factory, ids[1])).status == MessageStatus.SENDING
    assert await _sms_sent(session_factory, user) == 3
    # Only the claimed message's task stays in the device's stream.
    assert await _queued_tasks(redis, redis_keys, device_id) == [str(ids[1])]

    again = await client.post(
        f"{PROGRESS_URL}/{task['task_id']}/cancel", headers=user.headers
    )
    assert again.status_code == 200, again.text
    assert again.json()["data"]["cancelled"] == 0
    assert again.json()["data"]["counts"] == data["counts"]
    assert await _sms_sent(session_factory, user) == 3
    assert await _deliveries(session_factory, user) == 3


async def test_bulk_cancel_in_chunks(
    client: AsyncClient,
    user: ApiUser,
    session_factory: SessionFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bulk_service, "CANCEL_BATCH_SIZE", 2)
    task = await _send_bulk(client, user, 5)

    response = await client.post(
        f"{PROGRESS_URL}/{task['task_id']}/cancel", headers=user.headers
    )

    assert response.status_code == 200, response.text
    assert response.json()["data"]["cancelled"] == 5
    assert response.json()["data"]["status"] == "completed"
    assert await _sms_sent(session_factory, user) == 0


async def test_bulk_cancel_other_users_task(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="pro")
    stranger = await make_user(plan="pro")
    task = await _send_bulk(client, owner, 2)

    foreign = await client.post(
        f"{PROGRESS_URL}/{task['task_id']}/cancel", headers=stranger.headers
    )
    unknown = await client.post(
        f"{PROGRESS_URL}/{uuid.uuid4()}/cancel", headers=owner.headers
    )

    assert foreign.status_code == 404
    assert foreign.json()["error"] == "bulk_task_not_found"
    assert foreign.json()["task_id"] == task["task_id"]
    assert unknown.status_code == 404
    for message_id in task["message_ids"]:
        row = await _load(session_factory, uuid.UUID(message_id))
        assert row.status == MessageStatus.PENDING
    assert await _sms_sent(session_factory, owner) == 2


@pytest.mark.parametrize("delete_delay_s", [0.0, 0.05])
async def test_bulk_cancel_and_device_delete_race(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: SessionFactory,
    delete_delay_s: float,
) -> None:
    owner = await make_user(plan="pro")
    device = await register_device(client, owner)
    device_id = uuid.UUID(device["id"])
    task = await _send_bulk(client, owner, 1000)
    ids = [uuid.UUID(value) for value in task["message_ids"]]
    async with session_factory() as session:
        await session.execute(
            update(SMSMessage)
            .where(SMSMessage.id.in_(ids))
            .values(
                status=MessageStatus.ASSIGNED,
                device_id=device_id,
                attempts=1,
                assigned_at=datetime.now(UTC),
            )
        )
        await message_attempts.start_attempts(
            session, [(message_id, 1, device_id) for message_id in ids]
        )
        await session.commit()

    # The delete nulls the device_id of every message while the cancel holds a batch
    # of them locked.
    cancel = asyncio.create_task(
        client.post(f"{PROGRESS_URL}/{task['task_id']}/cancel", headers=owner.headers)
    )
    await asyncio.sleep(delete_delay_s)
    delete = await client.delete(
        f"/api/v1/sms/devices/{device_id}", headers=owner.headers
    )
    cancelled = await cancel

    assert delete.status_code == 200, delete.text
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["data"]["cancelled"] == 1000
    assert await _sms_sent(session_factory, owner) == 0
