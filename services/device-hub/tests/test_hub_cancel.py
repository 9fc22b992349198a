"""Cancels through the API, of one message or a bulk send, against the phone's claims
(`sending` reports).

For each message, either the claim is applied first, and the cancel leaves the message
alone (409 for a single cancel), or the cancel is, and the claim's `ack` names `failed`,
so the phone does not send.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from httpx import ASGITransport, AsyncClient
from hub_helpers import (
    DeviceRecord,
    create_device,
    create_outgoing,
    load_message,
    open_socket,
    receive,
    receive_type,
    request,
    send,
)
from redis.asyncio import Redis
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.auth.security import create_access_token
from mensajero_api.main import create_app as create_api
from mensajero_api.quotas import repository as quotas_repository
from mensajero_common import message_attempts, protocol, queues
from mensajero_common.keys import RedisKeys
from mensajero_common.models import (
    AttemptStatus,
    MessageStatus,
    SMSBulkTask,
    SMSMessage,
    SMSMessageAttempt,
    UserQuota,
    WebhookConfig,
    WebhookEvent,
)
from mensajero_common.settings import Settings
from mensajero_common.webhooks import EVENTS

Sessions = async_sessionmaker[AsyncSession]

# Rounds of the race between a cancel and a claim.
RACE_ROUNDS = 30
# Rounds, and messages per round, of the race between a bulk cancel and claims.
BULK_RACE_ROUNDS = 5
BULK_RACE_SIZE = 12


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The race sends many cancels from one user in a short time.
    return settings.model_copy(update={"RATE_LIMIT_ENABLED": False})


@pytest.fixture
async def api(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> AsyncIterator[AsyncClient]:
    app = create_api(settings)
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app)
        async with AsyncClient(
            transport=transport, base_url="http://testserver"
        ) as client:
            yield client


async def _owner_headers(
    sessions: Sessions, settings: Settings, device: DeviceRecord, used: int
) -> dict[str, str]:
    """Give the device's owner a quota with `used` SMS sent; return its auth headers."""
    async with sessions() as db:
        plan = await quotas_repository.get_plan_by_code(db, "pro")
        assert plan is not None
        await quotas_repository.insert_quota(db, device.user_id, plan.id)
        await db.execute(
            update(UserQuota)
            .where(UserQuota.user_id == device.user_id)
            .values(sms_sent_this_month=used)
        )
        db.add(
            WebhookConfig(
                user_id=device.user_id,
                url="https://example.com/hook",
                secret_key="secret",
                events=list(EVENTS),
            )
        )
        await db.commit()
    token = create_access_token(device.user_id, 0, settings).token
    return {"Authorization": f"Bearer {token}"}


async def _assigned_message(
    sessions: Sessions, redis: Redis, keys: RedisKeys, device: DeviceRecord
) -> SMSMessage:
    """Create a message assigned to the device, with its attempt and queued task, as
    the dispatcher leaves it."""
    message = await create_outgoing(sessions, device, from_number="+34600000099")
    async with sessions() as db:
        await message_attempts.start_attempts(db, [(message.id, 1, device.device_id)])
        await db.commit()
    frame = protocol.task_frame(
        message.id,
        message.to_number or "",
        message.body,
        segments=message.segments,
        encoding=message.encoding,
        created_at=message.created_at,
        attempt=1,
    )
    await queues.push_device_task(redis, keys, device.device_id, message.id, frame)
    return message


async def _claim(socket: Any, message_id: uuid.UUID) -> dict[str, Any]:
    return await request(
        socket,
        {
            "type": "sms_report",
            "message_id": str(message_id),
            "status": "sending",
            "attempt": 1,
        },
    )


async def _claim_all(
    socket: Any, message_ids: list[uuid.UUID]
) -> dict[uuid.UUID, dict[str, Any]]:
    """Claim every message at once, so the hub applies the claims in shared batches;
    return the `ack` of each."""
    requests = {uuid.uuid4().hex: message_id for message_id in message_ids}
    for request_id, message_id in requests.items():
        frame = {
            "type": "sms_report",
            "message_id": str(message_id),
            "status": "sending",
            "attempt": 1,
            "request_id": request_id,
        }
        await send(socket, frame)
    acks: dict[uuid.UUID, dict[str, Any]] = {}
    while len(acks) < len(requests):
        reply = await receive(socket)
        if reply.get("request_id") in requests:
            acks[requests[reply["request_id"]]] = reply
    return acks


async def _bulk_task(
    sessions: Sessions, device: DeviceRecord, message_ids: list[uuid.UUID]
) -> uuid.UUID:
    """Group the messages into a bulk task of the device's owner; return its id."""
    async with sessions() as db:
        task = SMSBulkTask(
            user_id=device.user_id,
            total_recipients=len(message_ids),
            message_ids=message_ids,
            rejected=[],
        )
        db.add(task)
        await db.flush()
        await db.execute(
            update(SMSMessage)
            .where(SMSMessage.id.in_(message_ids))
            .values(bulk_id=task.id)
        )
        await db.commit()
        return task.id


async def _sms_sent(sessions: Sessions, user_id: uuid.UUID) -> int:
    async with sessions() as db:
        used = await db.scalar(
            select(UserQuota.sms_sent_this_month).where(UserQuota.user_id == user_id)
        )
    assert used is not None
    return used


async def _event_names(sessions: Sessions, message_id: uuid.UUID) -> list[str]:
    async with sessions() as db:
        rows = await db.scalars(
            select(WebhookEvent.event).where(WebhookEvent.message_id == message_id)
        )
        return sorted(rows)


async def _attempt(sessions: Sessions, message_id: uuid.UUID) -> SMSMessageAttempt:
    async with sessions() as db:
        row = await db.scalar(
            select(SMSMessageAttempt).where(SMSMessageAttempt.message_id == message_id)
        )
    assert row is not None
    return row


async def test_claim_after_cancel_refused(
    hub_url: str,
    api: AsyncClient,
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    headers = await _owner_headers(session_factory, settings, device, used=1)
    message = await _assigned_message(session_factory, redis, redis_keys, device)

    async with open_socket(hub_url, device.api_key) as socket:
        task = await receive_type(socket, "task")
        cancelled = await api.post(
            f"/api/v1/sms/messages/{message.id}/cancel", headers=headers
        )
        ack = await _claim(socket, message.id)

    assert task["message_id"] == str(message.id)
    assert cancelled.status_code == 200, cancelled.text
    assert ack["type"] == "ack"
    assert ack["status"] == "failed"
    assert ack["attempt"] == 1
    row = await load_message(session_factory, message.id)
    assert row.status == MessageStatus.FAILED
    assert row.error == "cancelled"
    assert row.sending_at is None
    attempt = await _attempt(session_factory, message.id)
    assert attempt.status == AttemptStatus.FAILED
    assert attempt.acknowledged_at is None
    assert await _sms_sent(session_factory, device.user_id) == 0
    assert await _event_names(session_factory, message.id) == ["sms_failed"]
    assert await redis.xlen(redis_keys.device_tasks_stream(device.device_id)) == 0


async def test_cancel_after_claim_conflicts(
    hub_url: str,
    api: AsyncClient,
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    headers = await _owner_headers(session_factory, settings, device, used=1)
    message = await _assigned_message(session_factory, redis, redis_keys, device)

    async with open_socket(hub_url, device.api_key) as socket:
        ack = await _claim(socket, message.id)
        cancelled = await api.post(
            f"/api/v1/sms/messages/{message.id}/cancel", headers=headers
        )

    assert ack["status"] == "sending"
    assert cancelled.status_code == 409
    assert cancelled.json()["error"] == "message_not_cancellable"
    assert cancelled.json()["status"] == "sending"
    row = await load_message(session_factory, message.id)
    assert row.status == MessageStatus.SENDING
    assert row.error is None
    assert await _sms_sent(session_factory, device.user_id) == 1
    assert await _event_names(session_factory, message.id) == []
    # The task stays in the stream for the phone that claimed it.
    assert await redis.xlen(redis_keys.device_tasks_stream(device.device_id)) == 1


async def test_cancel_and_claim_race(
    hub_url: str,
    api: AsyncClient,
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    headers = await _owner_headers(session_factory, settings, device, RACE_ROUNDS)
    outcomes: dict[str, int] = {"cancel": 0, "claim": 0}

    async with open_socket(hub_url, device.api_key) as socket:
        for _ in range(RACE_ROUNDS):
            message = await _assigned_message(
                session_factory, redis, redis_keys, device
            )
            cancelled, ack = await asyncio.gather(
                api.post(f"/api/v1/sms/messages/{message.id}/cancel", headers=headers),
                _claim(socket, message.id),
            )

            row = await load_message(session_factory, message.id)
            if cancelled.status_code == 200:
                outcomes["cancel"] += 1
                assert ack["status"] == "failed"
                assert row.status == MessageStatus.FAILED
                assert row.error == "cancelled"
                assert await _event_names(session_factory, message.id) == ["sms_failed"]
            else:
                outcomes["claim"] += 1
                assert cancelled.status_code == 409, cancelled.text
                assert cancelled.json()["status"] == "sending"
                assert ack["status"] == "sending"
                assert row.status == MessageStatus.SENDING
                assert await _event_names(session_factory, message.id) == []

    assert outcomes["cancel"] + outcomes["claim"] == RACE_ROUNDS
    # Each cancel gave its SMS back once; each claimed message kept its charge.
    used = await _sms_sent(session_factory, device.user_id)
    assert used == RACE_ROUNDS - outcomes["cancel"]
    async with session_factory() as db:
        refunded = await db.scalar(
            select(func.count())
            .select_from(SMSMessage)
            .where(
                SMSMessage.user_id == device.user_id,
                SMSMessage.quota_refunded_at.is_not(None),
            )
        )
    assert refunded == outcomes["cancel"]


async def test_bulk_cancel_and_claims_race(
    hub_url: str,
    api: AsyncClient,
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    total = BULK_RACE_ROUNDS * BULK_RACE_SIZE
    headers = await _owner_headers(session_factory, settings, device, total)
    cancelled_in_all = 0

    async with open_socket(hub_url, device.api_key) as socket:
        for _ in range(BULK_RACE_ROUNDS):
            messages = [
                await _assigned_message(session_factory, redis, redis_keys, device)
                for _ in range(BULK_RACE_SIZE)
            ]
            message_ids = [message.id for message in messages]
            task_id = await _bulk_task(session_factory, device, message_ids)

            cancelled, acks = await asyncio.gather(
                api.post(f"/api/v1/sms/bulk/{task_id}/cancel", headers=headers),
                _claim_all(socket, message_ids),
            )

            assert cancelled.status_code == 200, cancelled.text
            data = cancelled.json()["data"]
            claimed = [
                message_id
                for message_id in message_ids
                if acks[message_id]["status"] == "sending"
            ]
            rejected_claims = [
                message_id
                for message_id in message_ids
                if acks[message_id]["status"] == "failed"
            ]
            assert len(claimed) + len(rejected_claims) == BULK_RACE_SIZE
            assert data["cancelled"] == len(rejected_claims)
            assert data["counts"]["failed"] == len(rejected_claims)
            assert data["counts"]["sending"] == len(claimed)
            for message_id in rejected_claims:
                row = await load_message(session_factory, message_id)
                assert row.status == MessageStatus.FAILED
                assert row.error == "cancelled"
            for message_id in claimed:
                row = await load_message(session_factory, message_id)
                assert row.status == MessageStatus.SENDING
            cancelled_in_all += len(rejected_claims)

    assert await _sms_sent(session_factory, device.user_id) == total - cancelled_in_all
