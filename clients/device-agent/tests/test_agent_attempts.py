"""The agent against a real hub: retries as new attempts, expiry, part reports."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from agent_helpers import (
    WS_PATH,
    Sessions,
    create_device,
    load_message,
    push_again,
    queue_message,
    running_agent,
    serve_hub_on,
)
from redis.asyncio import Redis
from sqlalchemy import select, update
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from mensajero_agent import MessageLedger, SendingBackend, SendOutcome, SimulatedBackend
from mensajero_common.keys import RedisKeys
from mensajero_common.models import (
    AttemptStatus,
    MessageStatus,
    SMSMessage,
    SMSMessageAttempt,
    SMSMessagePart,
)
from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, scaled


class ScriptedBackend(SendingBackend):
    """Returns the scripted send outcomes in turn, then `sent`; counts the sends."""

    def __init__(self, outcomes: list[SendOutcome]) -> None:
        self.outcomes = list(outcomes)
        self.sent_count = 0

    async def send(self, task: dict[str, Any]) -> SendOutcome:
        self.sent_count += 1
        return self.outcomes.pop(0) if self.outcomes else SendOutcome.sent()

    async def wait_for_delivery(self, task: dict[str, Any]) -> SendOutcome | None:
        return SendOutcome("delivered")


@pytest.fixture
async def hub(settings: Settings, session_factory: Sessions, redis: Redis) -> Any:
    async with serve_hub_on(settings, free_port()) as url:
        yield url


async def start_next_attempt(
    sessions: Sessions, redis: Redis, keys: RedisKeys, device_id: Any, message_id: Any
) -> None:
    """Assign the message's next attempt to the same device, as the dispatcher does."""
    async with sessions() as db:
        await db.execute(
            update(SMSMessage)
            .where(SMSMessage.id == message_id)
            .values(
                status=MessageStatus.ASSIGNED.value,
                attempts=SMSMessage.attempts + 1,
                sent_at=None,
                delivered_at=None,
            )
        )
        await db.commit()
    await push_again(redis, keys, device_id, await load_message(sessions, message_id))


async def test_agent_sends_retry_attempt_again(
    hub: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    backend = ScriptedBackend([SendOutcome.failed("RESULT_ERROR_NO_SERVICE")])

    async with running_agent(hub, api_key, backend) as (_, events, _):
        await events.wait_for("registered")
        message_id = await queue_message(
            session_factory, redis, redis_keys, device_id, user_id
        )
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="pending"
        )
        await start_next_attempt(
            session_factory, redis, redis_keys, device_id, message_id
        )
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="delivered"
        )

    row = await load_message(session_factory, message_id)
    assert backend.sent_count == 2
    assert row.status == MessageStatus.DELIVERED
    assert row.attempts == 2
    assert [event["attempt"] for event in events.matching("task")] == [1, 2]


async def test_agent_reports_earlier_send_for_new_attempt(
    hub: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    ledger = MessageLedger()
    backend = ScriptedBackend([])
    message_id = await queue_message(
        session_factory, redis, redis_keys, device_id, user_id, attempts=2
    )
    # The phone sent attempt 1 and its reports were lost; the server moved the message
    # and gave the same phone attempt 2.
    ledger.record(str(message_id), "delivered", attempt=1)

    async with running_agent(hub, api_key, backend, ledger=ledger) as (_, events, _):
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="delivered"
        )

    assert backend.sent_count == 0
    assert (await load_message(session_factory, message_id)).attempts == 2


async def test_agent_skips_expired_task() -> None:
    # The hub never pushes an expired task, so a server that does stands in for a task
    # that expired between the push and the phone reading it.
    reports: list[dict[str, Any]] = []
    reported = asyncio.Event()
    task = {
        "type": "task",
        "message_id": "6a919676-1fee-44b0-9d0e-a8123a67a16f",
        "to": "+34600000001",
        "body": "Hola",
        "segments": 1,
        "encoding": "gsm7",
        "attempt": 1,
        "expires_at": (datetime.now(UTC) - timedelta(seconds=1)).isoformat(),
    }

    async def late_hub(socket: ServerConnection) -> None:
        async for raw in socket:
            frame = orjson.loads(raw)
            if frame["type"] == "register":
                await socket.send(
                    orjson.dumps(
                        {
                            "type": "ack",
                            "of": "register",
                            "request_id": frame["request_id"],
                        }
                    ).decode()
                )
                await socket.send(orjson.dumps(task).decode())
            elif frame["type"] == "sms_report":
                reports.append(frame)
                reported.set()

    backend = ScriptedBackend([])
    async with serve(late_hub, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}{WS_PATH}"
        async with running_agent(url, "mdk_any", backend) as (_, events, _):
            await events.wait_for("report", status="expired")
            async with asyncio.timeout(scaled(5)):
                await reported.wait()

    assert backend.sent_count == 0
    assert reports[0]["status"] == "expired"
    assert reports[0]["attempt"] == 1


async def test_agent_reports_each_part(
    hub: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    message_id = await queue_message(
        session_factory, redis, redis_keys, device_id, user_id, segments=3
    )
    backend = SimulatedBackend(send_delay_ms=0, delivery_delay_ms=0)

    async with running_agent(hub, api_key, backend, report_parts=True) as (
        _,
        events,
        _,
    ):
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="delivered"
        )

    parts = [event["part"] for event in events.matching("report", status="sent")]
    assert parts == [1, 2, 3]
    async with session_factory() as db:
        stored = await db.scalars(
            select(SMSMessagePart.status).where(SMSMessagePart.message_id == message_id)
        )
        assert list(stored) == ["delivered"] * 3


async def test_agent_sends_only_after_claim() -> None:
    # The server answers the `sending` report with another attempt: the task moved to
    # another phone meanwhile, so this one must not send it.
    task = {
        "type": "task",
        "message_id": "df5c4300-be9d-4a72-a74d-5ec9bcc7c785",
        "to": "+34600000001",
        "body": "Hola",
        "segments": 1,
        "encoding": "gsm7",
        "attempt": 1,
    }
    answered = asyncio.Event()

    async def moving_hub(socket: ServerConnection) -> None:
        async for raw in socket:
            frame = orjson.loads(raw)
            if frame["type"] == "register":
                ack = {
                    "type": "ack",
                    "of": "register",
                    "request_id": frame["request_id"],
                }
                await socket.send(orjson.dumps(ack).decode())
                await socket.send(orjson.dumps(task).decode())
            elif frame["type"] == "sms_report":
                ack = {
                    "type": "ack",
                    "of": "sms_report",
                    "request_id": frame["request_id"],
                    "message_id": frame["message_id"],
                    "status": "sending",
                    "attempt": 2,
                }
                await socket.send(orjson.dumps(ack).decode())
                answered.set()

    backend = ScriptedBackend([])
    async with serve(moving_hub, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}{WS_PATH}"
        async with running_agent(url, "mdk_any", backend) as (_, events, _):
            dropped = await events.wait_for("task_dropped")
            async with asyncio.timeout(scaled(5)):
                await answered.wait()

    assert backend.sent_count == 0
    assert dropped["status"] == "sending"
    assert dropped["attempt"] == 1


@asynccontextmanager
async def claim_holding_relay(hub_url: str) -> AsyncIterator[tuple[str, Any, Any]]:
    """Relay an agent's connection to the hub and hold its first `sending` report until
    `release` is set.

    Yields the relay's URL, an event set once the report is held, and `release`.
    """
    held = asyncio.Event()
    release = asyncio.Event()
    hub_origin = hub_url.removesuffix(WS_PATH)

    async def relay(agent_socket: ServerConnection) -> None:
        path = agent_socket.request.path if agent_socket.request else WS_PATH
        async with connect(hub_origin + path, compression=None) as hub_socket:

            async def to_hub() -> None:
                async for raw in agent_socket:
                    frame = orjson.loads(raw)
                    if frame.get("status") == "sending" and not held.is_set():
                        held.set()
                        await release.wait()
                    await hub_socket.send(raw)

            async def to_agent() -> None:
                async for raw in hub_socket:
                    await agent_socket.send(raw)

            directions = [
                asyncio.create_task(to_hub()),
                asyncio.create_task(to_agent()),
            ]
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
            for direction in directions:
                direction.cancel()

    async with serve(relay, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}{WS_PATH}", held, release


async def test_agent_drops_retry_sent_earlier(
    hub: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    first_id, user_id, first_key = await create_device(session_factory)
    retry_id, _, retry_key = await create_device(session_factory, user_id=user_id)
    # Attempt 1 failed on the first phone, and the retry, attempt 2, waits for the
    # agent's phone.
    message_id = await queue_message(
        session_factory, redis, redis_keys, retry_id, user_id, attempts=2
    )
    async with session_factory() as db:
        db.add_all(
            [
                SMSMessageAttempt(
                    message_id=message_id,
                    attempt_number=1,
                    device_id=first_id,
                    status=AttemptStatus.FAILED.value,
                    error="RESULT_ERROR_NO_SERVICE",
                ),
                SMSMessageAttempt(
                    message_id=message_id,
                    attempt_number=2,
                    device_id=retry_id,
                    status=AttemptStatus.ASSIGNED.value,
                ),
            ]
        )
        await db.commit()
    late_report = {
        "type": "sms_report",
        "request_id": "late",
        "message_id": str(message_id),
        "status": "sent",
        "attempt": 1,
    }
    ledger = MessageLedger()
    backend = ScriptedBackend([])

    async with (
        claim_holding_relay(hub) as (relay_url, held, release),
        running_agent(relay_url, retry_key, backend, ledger=ledger) as (_, events, _),
    ):
        async with asyncio.timeout(scaled(5)):
            await held.wait()
        # While the agent's claim is on its way, the first phone learns that its SMS
        # went out after all, which cancels the retry.
        async with connect(f"{hub}?api_key={first_key}", compression=None) as socket:
            await socket.send(orjson.dumps(late_report).decode())
            async with asyncio.timeout(scaled(5)):
                late = orjson.loads(await socket.recv())
        release.set()
        dropped = await events.wait_for("task_dropped", message_id=str(message_id))

    row = await load_message(session_factory, message_id)
    assert late["status"] == "sent"
    assert backend.sent_count == 0
    # The agent's phone sent nothing, so its ledger must not record the SMS as its own.
    assert ledger.get(str(message_id)) is None
    assert dropped["status"] == "sent"
    assert dropped["attempt"] == 2
    assert dropped.get("reason") == "already_sent"
    assert events.matching("report", message_id=str(message_id), status="sent") == []
    assert row.status == MessageStatus.SENT
    assert row.device_id == first_id
