"""How the agent stops: Ctrl-C and SIGTERM, kills, and what it prints about the hub URL.

The command-line tests run `mensajero-agent` as a real process against a real hub and
send it real signals.
"""

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
import pytest
from agent_helpers import (
    WS_PATH,
    Sessions,
    create_device,
    load_message,
    queue_message,
    running_agent,
    serve_hub_on,
)
from redis.asyncio import Redis
from test_agent_attempts import start_next_attempt
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from mensajero_agent import (
    EventRecorder,
    MessageLedger,
    SendingBackend,
    SendOutcome,
    SimulatedBackend,
)
from mensajero_common.keys import RedisKeys
from mensajero_common.models import MessageStatus
from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, scaled

# A key of the device key's form, for the tests that never reach a hub.
UNUSED_KEY = "mdk_0123456789abcdefghijklmnopqrstuvwxyzABCD"


@pytest.fixture
async def hub(settings: Settings, session_factory: Sessions, redis: Redis) -> Any:
    async with serve_hub_on(settings, free_port()) as url:
        yield url


@asynccontextmanager
async def agent_process(
    url: str, api_key: str, *options: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, EventRecorder]]:
    """Run `mensajero-agent` and feed its events to a recorder. Kill it at the end."""
    events = EventRecorder()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mensajero_agent.cli",
        "--url",
        url,
        "--backoff-max-s",
        "0.2",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "MENSAJERO_DEVICE_API_KEY": api_key},
    )

    async def read_events() -> None:
        assert child.stdout is not None
        while line := await child.stdout.readline():
            events(orjson.loads(line))

    reader = asyncio.create_task(read_events())
    try:
        yield child, events
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
        await asyncio.wait_for(reader, scaled(5))


async def wait_for_exit(child: asyncio.subprocess.Process) -> int:
    return await asyncio.wait_for(child.wait(), scaled(10))


def report_acks(events: EventRecorder, message_id: Any) -> list[str]:
    return [
        event["status"]
        for event in events.matching("report_ack", message_id=str(message_id))
    ]


# Ctrl-C and SIGTERM.


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"]
)
async def test_signal_lets_send_finish(
    hub: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    tmp_path: Path,
    signum: signal.Signals,
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)

    async with agent_process(
        hub,
        api_key,
        "--state-file",
        str(tmp_path / "state.jsonl"),
        "--send-delay-ms",
        str(int(scaled(1) * 1000)),
        "--delivery-delay-ms",
        "100",
    ) as (child, events):
        await events.wait_for("registered", timeout_s=scaled(10))
        message_id = await queue_message(
            session_factory, redis, redis_keys, device_id, user_id
        )
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="sending"
        )
        child.send_signal(signum)
        returncode = await wait_for_exit(child)
    row = await load_message(session_factory, message_id)
    names = [event["event"] for event in events.events]

    assert returncode == 0
    assert report_acks(events, message_id) == ["sending", "sent", "delivered"]
    assert row.status == MessageStatus.DELIVERED
    assert "stopping" in names
    assert names[-1] == "stopped"


@pytest.mark.parametrize("grace_end", ["--stop-grace-s", "second signal"])
async def test_grace_end_reports_send_retryable(
    hub: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    tmp_path: Path,
    grace_end: str,
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    state_file = tmp_path / "state.jsonl"
    options = ["--state-file", str(state_file), "--send-delay-ms", "60000"]
    if grace_end == "--stop-grace-s":
        options += ["--stop-grace-s", "0.2"]

    async with agent_process(hub, api_key, *options) as (child, events):
        await events.wait_for("registered", timeout_s=scaled(10))
        message_id = await queue_message(
            session_factory, redis, redis_keys, device_id, user_id
        )
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="sending"
        )
        child.send_signal(signal.SIGTERM)
        if grace_end == "second signal":
            await events.wait_for("stopping")
            child.send_signal(signal.SIGTERM)
        returncode = await wait_for_exit(child)
    row = await load_message(session_factory, message_id)
    recorded = MessageLedger(state_file).get(str(message_id))

    # The server retries the message. The retry is a new attempt, which the agent
    # sends after a restart with the same state file.
    await start_next_attempt(session_factory, redis, redis_keys, device_id, message_id)
    backend = SimulatedBackend(send_delay_ms=0, delivery_delay_ms=0)
    async with running_agent(
        hub, api_key, backend, ledger=MessageLedger(state_file)
    ) as (_, restarted, _):
        await restarted.wait_for(
            "report_ack", message_id=str(message_id), status="delivered"
        )
    retried = await load_message(session_factory, message_id)

    assert returncode == 0
    # The hub acknowledges a failure that the server retries with `pending`.
    assert report_acks(events, message_id) == ["sending", "pending"]
    assert row.status == MessageStatus.PENDING
    assert row.error is not None
    assert "agent stopped" in row.error
    assert recorded is not None
    assert (recorded.status, recorded.retryable) == ("failed", True)
    assert backend.sent_count == 1
    assert retried.status == MessageStatus.DELIVERED
    assert retried.attempts == 2


class HeldBackend(SendingBackend):
    """Sends only when the test opens the gate, and counts the sends."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sent_count = 0

    async def send(self, task: dict[str, Any]) -> SendOutcome:
        await self.gate.wait()
        self.sent_count += 1
        return SendOutcome.sent()

    async def wait_for_delivery(self, task: dict[str, Any]) -> SendOutcome | None:
        return SendOutcome("delivered")


async def test_stopping_agent_takes_no_new_task(
    hub: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    backend = HeldBackend()

    async with running_agent(hub, api_key, backend) as (agent, events, _):
        await events.wait_for("registered")
        first_id = await queue_message(
            session_factory, redis, redis_keys, device_id, user_id
        )
        await events.wait_for("report_ack", message_id=str(first_id), status="sending")
        stopping = asyncio.create_task(agent.stop())
        await events.wait_for("stopping")
        second_id = await queue_message(
            session_factory, redis, redis_keys, device_id, user_id
        )
        dropped = await events.wait_for("task_dropped", message_id=str(second_id))
        backend.gate.set()
        await asyncio.wait_for(stopping, scaled(5))
    first = await load_message(session_factory, first_id)
    second = await load_message(session_factory, second_id)

    assert dropped["reason"] == "stopping"
    assert backend.sent_count == 1
    assert report_acks(events, first_id) == ["sending", "sent", "delivered"]
    assert report_acks(events, second_id) == []
    assert first.status == MessageStatus.DELIVERED
    assert second.status == MessageStatus.ASSIGNED


# Delivery reports due across a restart.


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGINT"])
async def test_delivery_due_reported_after_restart(
    hub: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    tmp_path: Path,
    stop: str,
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    state_file = tmp_path / "state.jsonl"
    options = ["--state-file", str(state_file), "--send-delay-ms", "0"]
    options += ["--delivery-delay-ms", "60000"]
    if stop == "SIGINT":
        options += ["--stop-grace-s", "0.2"]

    async with agent_process(hub, api_key, *options) as (child, events):
        await events.wait_for("registered", timeout_s=scaled(10))
        message_id = await queue_message(
            session_factory, redis, redis_keys, device_id, user_id
        )
        await events.wait_for("report_ack", message_id=str(message_id), status="sent")
        child.send_signal(signal.SIGKILL if stop == "SIGKILL" else signal.SIGINT)
        await wait_for_exit(child)
    before_restart = await load_message(session_factory, message_id)

    # The server never offers a `sent` message again, so only the state file can bring
    # its delivery report.
    backend = SimulatedBackend(send_delay_ms=0, delivery_delay_ms=0)
    async with running_agent(
        hub, api_key, backend, ledger=MessageLedger(state_file)
    ) as (_, restarted, _):
        await restarted.wait_for(
            "report_ack", message_id=str(message_id), status="delivered"
        )
    after_restart = await load_message(session_factory, message_id)
    recorded = MessageLedger(state_file).get(str(message_id))

    assert before_restart.status == MessageStatus.SENT
    assert after_restart.status == MessageStatus.DELIVERED
    assert backend.sent_count == 0
    assert recorded is not None
    assert (recorded.status, recorded.delivery_due) == ("delivered", False)


def test_ledger_reads_delivery_due(tmp_path: Path) -> None:
    path = tmp_path / "state.jsonl"
    ledger = MessageLedger(path)
    ledger.record("m1", "sent", attempt=1, delivery_due=True)
    ledger.record("m2", "sent", attempt=1)
    # A line of an earlier version, without the field.
    with path.open("ab") as file:
        file.write(orjson.dumps({"message_id": "m3", "status": "sent"}) + b"\n")

    reloaded = MessageLedger(path)

    assert [message_id for message_id, _ in reloaded.deliveries_due()] == ["m1"]
    assert reloaded.get("m3") is not None
    assert reloaded.get("m3").delivery_due is False  # type: ignore[union-attr]


# The hub URL and the key.


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mensajero_agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=scaled(20),
        env={**os.environ, "MENSAJERO_DEVICE_API_KEY": UNUSED_KEY},
        check=False,
    )


# Port 9 (discard) on the loopback address, which no test serves.
@pytest.mark.parametrize(
    "url",
    [
        f"http://127.0.0.1:9{WS_PATH}",
        f"https://127.0.0.1:9{WS_PATH}?api_key={UNUSED_KEY}",
        f"127.0.0.1:9{WS_PATH}",
    ],
)
def test_cli_rejects_non_ws_url(url: str) -> None:
    # --run-for-s ends an agent that takes the URL, so that the test ends either way.
    result = run_cli("--url", url, "--run-for-s", "1")

    assert result.returncode == 2
    assert "invalid --url" in result.stderr
    assert "ws" in result.stderr
    assert UNUSED_KEY not in result.stdout + result.stderr


@pytest.mark.parametrize("status", [HTTPStatus.NOT_FOUND, HTTPStatus.FORBIDDEN])
async def test_cli_hints_wrong_service(status: HTTPStatus) -> None:
    def reject(connection: ServerConnection, request: Request) -> Response:
        return connection.respond(status, "no WebSocket here\n")

    async def unused(socket: ServerConnection) -> None:
        raise AssertionError("the handshake was rejected")

    async with serve(unused, "127.0.0.1", 0, process_request=reject) as server:
        port = server.sockets[0].getsockname()[1]
        result = await asyncio.to_thread(
            run_cli, "--url", f"ws://127.0.0.1:{port}{WS_PATH}", "--run-for-s", "1"
        )
    errors = [
        event
        for event in map(orjson.loads, result.stdout.splitlines())
        if event["event"] == "error"
    ]

    assert result.returncode == 0, result.stderr
    assert errors
    assert f"HTTP {status.value}" in errors[0]["message"]
    assert "another service" in errors[0]["message"]
    assert UNUSED_KEY not in result.stdout + result.stderr


async def test_agent_redacts_key_in_errors() -> None:
    # The websockets library quotes the whole URL, key included, in this error.
    url = f"http://127.0.0.1:9{WS_PATH}"

    async with running_agent(url, UNUSED_KEY, SimulatedBackend()) as (_, events, _):
        error = await events.wait_for("error", error="connect_failed")
        await events.wait_for("disconnected")
    printed = orjson.dumps(events.events).decode()

    assert "api_key=[redacted]" in error["message"]
    assert UNUSED_KEY not in printed
