import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from agent_helpers import (
    WS_PATH,
    Sessions,
    create_device,
    eventually,
    load_message,
    push_again,
    queue_message,
    reset_to_assigned,
    running_agent,
    serve_hub_on,
)
from redis.asyncio import Redis
from sqlalchemy import select, update
from websockets.asyncio.server import ServerConnection, serve

from mensajero_agent import (
    AgentStoppedError,
    MessageLedger,
    RegisterRejectedError,
    SendingBackend,
    SendOutcome,
    SimulatedBackend,
)
from mensajero_common import queues
from mensajero_common.keys import CHANNEL_DISABLE, RedisKeys
from mensajero_common.models import DeviceStatus, MessageStatus, SMSDevice, SMSMessage
from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, scaled


def fast_backend(**options: Any) -> SimulatedBackend:
    options.setdefault("send_delay_ms", 0)
    options.setdefault("delivery_delay_ms", 0)
    return SimulatedBackend(seed=7, **options)


class GatedBackend(SendingBackend):
    """Sends only when the test opens the gate, to hold a task in flight."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sent_count = 0

    async def send(self, task: dict[str, Any]) -> SendOutcome:
        await self.gate.wait()
        self.sent_count += 1
        return SendOutcome.sent()

    async def wait_for_delivery(self, task: dict[str, Any]) -> SendOutcome | None:
        return SendOutcome("delivered")


@pytest.fixture
async def hub(settings: Settings, session_factory: Sessions, redis: Redis) -> Any:
    async with serve_hub_on(settings, free_port()) as url:
        yield url


async def test_agent_registers_name_and_number(
    hub: str, session_factory: Sessions
) -> None:
    device_id, _, api_key = await create_device(session_factory)

    async with running_agent(
        hub, api_key, fast_backend(), device_name="Demo", phone_number="+34600111222"
    ) as (agent, events, _):
        registered = await events.wait_for("registered")

    async with session_factory() as db:
        row = (
            await db.execute(select(SMSDevice).where(SMSDevice.id == device_id))
        ).scalar_one()
    assert registered["device_id"] == str(device_id)
    assert agent.device_id == str(device_id)
    assert row.name == "Demo"
    assert row.phone_number == "+34600111222"


async def test_agent_sends_and_reports_delivered(
    hub: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)

    async with running_agent(hub, api_key, fast_backend()) as (_, events, _):
        await events.wait_for("registered")
        message_id = await queue_message(
            session_factory, redis, redis_keys, device_id, user_id
        )
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="delivered"
        )

    row = await load_message(session_factory, message_id)
    statuses = [event["status"] for event in events.matching("report")]
    assert statuses == ["sending", "sent", "delivered"]
    assert row.status == MessageStatus.DELIVERED
    assert row.sent_at is not None


async def test_agent_reports_simulated_failure(
    hub: str,
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)

    async with running_agent(hub, api_key, fast_backend(failure_rate=1.0)) as (
        _,
        events,
        _,
    ):
        await events.wait_for("registered")
        message_id = await queue_message(
            session_factory,
            redis,
            redis_keys,
            device_id,
            user_id,
            attempts=settings.MESSAGE_MAX_ATTEMPTS,
        )
        await events.wait_for("report_ack", message_id=str(message_id), status="failed")

    row = await load_message(session_factory, message_id)
    assert row.status == MessageStatus.FAILED
    assert row.error is not None
    assert "GENERIC_FAILURE" in row.error


async def test_agent_gets_tasks_queued_offline(
    hub: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    message_ids = [
        await queue_message(session_factory, redis, redis_keys, device_id, user_id)
        for _ in range(3)
    ]

    async with running_agent(hub, api_key, fast_backend()) as (_, events, _):
        for message_id in message_ids:
            await events.wait_for(
                "report_ack", message_id=str(message_id), status="delivered"
            )

    for message_id in message_ids:
        row = await load_message(session_factory, message_id)
        assert row.status == MessageStatus.DELIVERED


async def test_reoffered_task_is_reported_not_resent(
    hub: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    backend = fast_backend()

    async with running_agent(hub, api_key, backend) as (_, events, _):
        await events.wait_for("registered")
        message_id = await queue_message(
            session_factory, redis, redis_keys, device_id, user_id
        )
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="delivered"
        )
        message = await reset_to_assigned(session_factory, message_id)
        await push_again(redis, redis_keys, device_id, message)
        repeated = await events.wait_for(
            "task", message_id=str(message_id), repeated=True
        )
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="delivered", count=2
        )

    row = await load_message(session_factory, message_id)
    assert repeated["repeated"] is True
    assert backend.sent_count == 1
    assert row.status == MessageStatus.DELIVERED


async def test_state_file_prevents_resend_after_restart(
    hub: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    tmp_path: Path,
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    state_file = tmp_path / "handled.jsonl"
    first_backend = fast_backend()

    async with running_agent(
        hub, api_key, first_backend, ledger=MessageLedger(state_file)
    ) as (_, events, _):
        await events.wait_for("registered")
        message_id = await queue_message(
            session_factory, redis, redis_keys, device_id, user_id
        )
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="delivered"
        )

    message = await reset_to_assigned(session_factory, message_id)
    await push_again(redis, redis_keys, device_id, message)
    second_backend = fast_backend()
    async with running_agent(
        hub, api_key, second_backend, ledger=MessageLedger(state_file)
    ) as (_, events, _):
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="delivered"
        )

    assert first_backend.sent_count == 1
    assert second_backend.sent_count == 0


async def test_task_in_flight_survives_reconnect(
    settings: Settings, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    port = free_port()
    backend = GatedBackend()

    async with contextlib.AsyncExitStack() as first_hub:
        url = await first_hub.enter_async_context(serve_hub_on(settings, port))
        async with running_agent(url, api_key, backend) as (_, events, _):
            await events.wait_for("registered")
            message_id = await queue_message(
                session_factory, redis, redis_keys, device_id, user_id
            )
            await events.wait_for(
                "report_ack", message_id=str(message_id), status="sending"
            )

            await first_hub.aclose()
            disconnected = await events.wait_for("disconnected")
            async with serve_hub_on(settings, port):
                await events.wait_for("registered", count=2)
                offered_again = await events.wait_for(
                    "task", message_id=str(message_id), count=2
                )
                backend.gate.set()
                await events.wait_for(
                    "report_ack", message_id=str(message_id), status="delivered"
                )

    assert disconnected["code"] == 1012
    assert offered_again["repeated"] is True
    assert backend.sent_count == 1


async def test_incoming_uploads_once_hub_is_up(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    device_id, _, api_key = await create_device(session_factory)
    port = free_port()
    url = f"ws://127.0.0.1:{port}{WS_PATH}"

    async with running_agent(url, api_key, fast_backend()) as (agent, events, _):
        sms_id = agent.inject_incoming("+34611223344", "Hola")
        await events.wait_for("disconnected")
        async with serve_hub_on(settings, port):
            ack = await events.wait_for("incoming_ack", sms_id=sms_id)
            pending = agent.pending_count

    async with session_factory() as db:
        rows = (
            (
                await db.execute(
                    select(SMSMessage).where(SMSMessage.device_id == device_id)
                )
            )
            .scalars()
            .all()
        )
    assert len(rows) == 1
    assert ack["message_id"] == str(rows[0].id)
    assert rows[0].external_id == sms_id
    assert rows[0].body == "Hola"
    assert pending == 0


async def test_invalid_key_stops_agent(hub: str, session_factory: Sessions) -> None:
    async with running_agent(hub, "mdk_not-a-key", fast_backend()) as (_, events, task):
        with pytest.raises(AgentStoppedError) as stopped:
            await asyncio.wait_for(task, scaled(5))

    assert stopped.value.code == 4001
    assert "API key" in str(stopped.value)
    assert events.matching("error", error="invalid_api_key")
    assert len(events.matching("connected")) == 1


async def load_device(session_factory: Sessions, device_id: uuid.UUID) -> SMSDevice:
    async with session_factory() as db:
        return (
            await db.execute(select(SMSDevice).where(SMSDevice.id == device_id))
        ).scalar_one()


@pytest.mark.parametrize("name", ["a\tb", "a\u202eb"])
async def test_rejected_name_stops_agent(
    hub: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    name: str,
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    message_id = await queue_message(
        session_factory, redis, redis_keys, device_id, user_id
    )

    async with running_agent(
        hub, api_key, fast_backend(), device_name=name, language="en"
    ) as (_, events, task):
        with pytest.raises(RegisterRejectedError) as stopped:
            await asyncio.wait_for(task, scaled(5))

    async def offline() -> bool:
        row = await load_device(session_factory, device_id)
        return bool(row.status == DeviceStatus.OFFLINE)

    await eventually(offline)
    message = await load_message(session_factory, message_id)
    device = await load_device(session_factory, device_id)
    assert stopped.value.error == "invalid_frame"
    assert stopped.value.fields == ("device_name",)
    assert "device_name" in stopped.value.message
    assert "rejected the register" in str(stopped.value)
    assert len(events.matching("connected")) == 1
    assert events.matching("registered") == []
    assert events.matching("disconnected", code=1000, retry_in_s=None)
    assert device.name == "Agent phone"
    assert message.status == MessageStatus.ASSIGNED
    assert message.sending_at is None


async def test_rejected_phone_stops_agent(hub: str, session_factory: Sessions) -> None:
    _, _, api_key = await create_device(session_factory)

    async with running_agent(
        hub, api_key, fast_backend(), device_name="Demo", phone_number="600123456"
    ) as (_, events, task):
        with pytest.raises(RegisterRejectedError) as stopped:
            await asyncio.wait_for(task, scaled(5))

    assert stopped.value.error == "invalid_phone_number"
    assert stopped.value.fields == ("phone_number",)
    assert len(events.matching("connected")) == 1


async def test_task_outlives_rejected_register(
    hub: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    message_id = await queue_message(
        session_factory, redis, redis_keys, device_id, user_id
    )
    backend = fast_backend()

    async with running_agent(hub, api_key, backend, device_name="a\tb") as (
        _,
        _,
        rejected,
    ):
        with pytest.raises(RegisterRejectedError):
            await asyncio.wait_for(rejected, scaled(5))
    async with running_agent(hub, api_key, backend, device_name="Pixel") as (
        _,
        events,
        _,
    ):
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="delivered"
        )

    row = await load_message(session_factory, message_id)
    assert backend.sent_count == 1
    assert row.status == MessageStatus.DELIVERED
    assert row.attempts == 1


async def test_register_internal_error_reconnects() -> None:
    connections = 0

    async def fail_first_register(socket: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        register = orjson.loads(await socket.recv())
        if connections == 1:
            answer = {"type": "error", "error": "internal_error", "message": "down"}
        else:
            answer = {"type": "ack", "of": "register", "device_id": "d1"}
        await socket.send(
            orjson.dumps({**answer, "request_id": register["request_id"]})
        )
        async for _ in socket:
            pass

    async with serve(fail_first_register, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}{WS_PATH}"
        async with running_agent(
            url, "mdk_any", fast_backend(), pong_timeout_s=0.2
        ) as (_, events, task):
            registered = await events.wait_for("registered")
            still_running = not task.done()

    assert events.matching("error", error="internal_error")
    assert registered["device_id"] == "d1"
    assert still_running
    assert connections == 2


async def set_device_active(
    session_factory: Sessions, device_id: uuid.UUID, is_active: bool
) -> None:
    async with session_factory() as session:
        await session.execute(
            update(SMSDevice)
            .where(SMSDevice.id == device_id)
            .values(is_active=is_active)
        )
        await session.commit()


async def test_disabled_device_stops_agent(
    hub: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device_id, _, api_key = await create_device(session_factory)

    async with running_agent(hub, api_key, fast_backend(), language="en") as (
        _,
        events,
        task,
    ):
        await events.wait_for("registered")
        await set_device_active(session_factory, device_id, False)
        await queues.publish_device_control(
            redis, redis_keys, device_id, CHANNEL_DISABLE
        )
        with pytest.raises(AgentStoppedError) as stopped:
            await asyncio.wait_for(task, scaled(5))

    assert stopped.value.code == 4001
    assert stopped.value.key_error_reason == "device_inactive"
    assert stopped.value.key_still_valid
    assert "the device is disabled" in str(stopped.value)
    assert "revoked" not in str(stopped.value)
    assert events.matching("error", error="invalid_api_key")
    assert len(events.matching("connected")) == 1


async def test_reenabled_device_reconnects_same_key(
    hub: str, session_factory: Sessions
) -> None:
    device_id, _, api_key = await create_device(session_factory)
    await set_device_active(session_factory, device_id, False)

    async with running_agent(hub, api_key, fast_backend()) as (_, _, disabled):
        with pytest.raises(AgentStoppedError) as stopped:
            await asyncio.wait_for(disabled, scaled(5))
    await set_device_active(session_factory, device_id, True)
    async with running_agent(hub, api_key, fast_backend()) as (_, events, _):
        registered = await events.wait_for("registered")

    assert stopped.value.key_error_reason == "device_inactive"
    assert registered["device_id"] == str(device_id)


async def test_throttled_agent_waits_retry_after(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    throttled = settings.model_copy(
        update={"DEVICE_AUTH_FAILURES_PER_IP": "2/3 seconds"}
    )
    _, _, api_key = await create_device(session_factory)

    async with serve_hub_on(throttled, free_port()) as url:
        # Two agents with a bad key, from the same address, use up the limit.
        for _ in range(2):
            async with running_agent(url, "mdk_not-a-key", fast_backend()) as (
                _,
                _,
                failing,
            ):
                with pytest.raises(AgentStoppedError):
                    await asyncio.wait_for(failing, scaled(5))
        async with running_agent(url, api_key, fast_backend()) as (_, events, _):
            registered = await events.wait_for("registered", timeout_s=scaled(10))

    closes = events.matching("disconnected", code=4030)
    waited_s = (
        datetime.fromisoformat(registered["at"])
        - datetime.fromisoformat(closes[0]["at"])
    ).total_seconds()
    assert len(closes) == 1
    assert 1 <= closes[0]["retry_in_s"] <= 3.5
    assert len(events.matching("error", error="too_many_auth_failures")) == 1
    assert len(events.matching("connected")) == 2
    # The event times are wall-clock times, the wait a monotonic one: allow for a
    # small difference.
    assert waited_s >= closes[0]["retry_in_s"] - 0.05


async def test_second_agent_replaces_first(hub: str, session_factory: Sessions) -> None:
    _, _, api_key = await create_device(session_factory)

    async with running_agent(hub, api_key, fast_backend()) as (_, first_events, first):
        await first_events.wait_for("registered")
        async with running_agent(hub, api_key, fast_backend()) as (_, second_events, _):
            await second_events.wait_for("registered")
            with pytest.raises(AgentStoppedError) as stopped:
                await asyncio.wait_for(first, scaled(5))

    assert stopped.value.code == 4002


async def test_pings_keep_agent_connected(
    settings: Settings, session_factory: Sessions
) -> None:
    settings = settings.model_copy(update={"WEBSOCKET_HEARTBEAT_TIMEOUT": 1})
    device_id, _, api_key = await create_device(session_factory)

    async with (
        serve_hub_on(settings, free_port()) as url,
        running_agent(url, api_key, fast_backend(), ping_interval_s=0.3) as (
            _,
            events,
            _,
        ),
    ):
        await events.wait_for("registered")
        await asyncio.sleep(1.6)
        async with session_factory() as db:
            row = (
                await db.execute(select(SMSDevice).where(SMSDevice.id == device_id))
            ).scalar_one()

    assert events.matching("disconnected") == []
    assert row.status == DeviceStatus.ONLINE


async def test_silent_server_makes_agent_reconnect() -> None:
    connections = 0

    async def never_answer(socket: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        async for _ in socket:
            pass

    async with serve(never_answer, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}{WS_PATH}"
        async with running_agent(
            url, "mdk_any", fast_backend(), pong_timeout_s=0.2
        ) as (_, events, _):
            timeout = await events.wait_for("error", error="register_timeout")
            await events.wait_for("connected", count=2)

    assert timeout["message"] == "no register ack"
    assert connections >= 2


def run_cli(*args: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mensajero_agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=scaled(timeout_s),
        env={**os.environ, "MENSAJERO_DEVICE_API_KEY": ""},
        check=False,
    )


async def test_cli_exits_2_on_invalid_key(hub: str, session_factory: Sessions) -> None:
    result = await asyncio.to_thread(
        run_cli, "--url", hub, "--api-key", "mdk_not-a-key"
    )

    assert result.returncode == 2
    assert "API key" in result.stderr
    events = [orjson.loads(line)["event"] for line in result.stdout.splitlines()]
    assert events[0] == "connected"
    assert "disconnected" in events


async def test_cli_exits_4_on_rejected_name(
    hub: str, session_factory: Sessions
) -> None:
    _, _, api_key = await create_device(session_factory)

    result = await asyncio.to_thread(
        run_cli,
        "--url",
        hub,
        "--api-key",
        api_key,
        "--name",
        "a\tb",
        "--language",
        "en",
        timeout_s=10,
    )

    events = [orjson.loads(line)["event"] for line in result.stdout.splitlines()]
    assert result.returncode == 4
    assert "rejected the register" in result.stderr
    assert "control characters" in result.stderr
    assert "Change --name (sent as device_name)" in result.stderr
    assert events.count("connected") == 1
    assert events[-1] == "stopped"


async def test_cli_quotes_server_in_english(
    hub: str, session_factory: Sessions
) -> None:
    _, _, api_key = await create_device(session_factory)

    # No --language: the hub's own default is Spanish.
    result = await asyncio.to_thread(
        run_cli, "--url", hub, "--api-key", api_key, "--name", "a\tb", timeout_s=10
    )

    assert result.returncode == 4
    assert "control characters" in result.stderr


async def test_cli_prints_events_as_json_lines(
    hub: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    message_id = await queue_message(
        session_factory, redis, redis_keys, device_id, user_id
    )

    result = await asyncio.to_thread(
        run_cli,
        "--url",
        hub,
        "--api-key",
        api_key,
        "--send-delay-ms",
        "10",
        "--delivery-delay-ms",
        "10",
        "--incoming",
        "+34611223344:Hola: qué tal",
        "--run-for-s",
        "2",
    )

    events = [orjson.loads(line) for line in result.stdout.splitlines()]
    names = [event["event"] for event in events]
    reports = [
        event["status"]
        for event in events
        if event["event"] == "report_ack" and event["message_id"] == str(message_id)
    ]
    row = await load_message(session_factory, message_id)
    assert result.returncode == 0, result.stderr
    assert names[0] == "incoming"
    assert "registered" in names
    assert "incoming_ack" in names
    assert reports == ["sending", "sent", "delivered"]
    assert names[-1] == "stopped"
    assert api_key not in result.stdout
    assert row.status == MessageStatus.DELIVERED


def test_cli_rejects_missing_key() -> None:
    result = run_cli("--url", "ws://127.0.0.1:9/ws")

    assert result.returncode == 2
    assert "missing API key" in result.stderr


def test_cli_rejects_bad_incoming() -> None:
    result = run_cli("--api-key", "k", "--incoming", "no-colon-here")

    assert result.returncode == 2
    assert "SENDER:TEXT" in result.stderr


class DeliveryGatedBackend(SendingBackend):
    """Sends at once and reports delivery only when the test opens the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def send(self, task: dict[str, Any]) -> SendOutcome:
        return SendOutcome.sent()

    async def wait_for_delivery(self, task: dict[str, Any]) -> SendOutcome | None:
        await self.gate.wait()
        return SendOutcome("delivered")


async def test_state_file_keeps_unacked_report(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    tmp_path: Path,
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    port = free_port()
    state_file = tmp_path / "handled.jsonl"
    backend = DeliveryGatedBackend()

    # The `delivered` report is queued while the hub is down, and the agent stops
    # before any hub acknowledges it.
    async with contextlib.AsyncExitStack() as first_hub:
        url = await first_hub.enter_async_context(serve_hub_on(settings, port))
        async with running_agent(
            url, api_key, backend, ledger=MessageLedger(state_file)
        ) as (_, events, _):
            await events.wait_for("registered")
            message_id = await queue_message(
                session_factory, redis, redis_keys, device_id, user_id
            )
            await events.wait_for(
                "report_ack", message_id=str(message_id), status="sent"
            )
            await first_hub.aclose()
            await events.wait_for("disconnected")
            backend.gate.set()
            await events.wait_for(
                "report", message_id=str(message_id), status="delivered"
            )
    before_restart = await load_message(session_factory, message_id)

    # The server never offers a `sent` message again, so only the kept report can
    # move it on.
    async with (
        serve_hub_on(settings, port) as url,
        running_agent(
            url, api_key, fast_backend(), ledger=MessageLedger(state_file)
        ) as (agent, events, _),
    ):
        ack = await events.wait_for(
            "report_ack", message_id=str(message_id), status="delivered"
        )
        pending = agent.pending_count

    after_restart = await load_message(session_factory, message_id)
    assert before_restart.status == MessageStatus.SENT
    assert ack["status"] == "delivered"
    assert after_restart.status == MessageStatus.DELIVERED
    assert pending == 0
    assert MessageLedger(state_file).unacknowledged_frames() == {}
