"""The agent keeps to the hub's frame rate limit (DEVICE_FRAMES_PER_SECOND)."""

import asyncio
from typing import Any

import orjson
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
from sqlalchemy import func, select
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from mensajero_agent import SimulatedBackend
from mensajero_common.keys import RedisKeys
from mensajero_common.models import MessageStatus, MessageType, SMSMessage
from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, scaled

# The hub admits bursts of 5 seconds' worth of frames (50 here). A backlog of 25 tasks
# makes 75 reports (sending, sent, delivered) plus the register. An unpaced agent sends
# them within a fraction of a second, so the hub rejects more than
# DEVICE_FRAME_FLOOD_MAX_ERRORS (10) frames in a row and closes with 4029.
HUB_FRAMES_PER_S = 10
BACKLOG_TASKS = 25


def fast_backend() -> SimulatedBackend:
    return SimulatedBackend(send_delay_ms=0, delivery_delay_ms=0, seed=7)


async def test_backlog_delivered_without_rate_limit(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    limited = settings.model_copy(update={"DEVICE_FRAMES_PER_SECOND": HUB_FRAMES_PER_S})
    device_id, user_id, api_key = await create_device(session_factory)
    message_ids = [
        await queue_message(
            session_factory, redis, redis_keys, device_id, user_id, f"Hola {n}"
        )
        for n in range(BACKLOG_TASKS)
    ]

    async with (
        serve_hub_on(limited, free_port()) as url,
        running_agent(url, api_key, fast_backend()) as (_, events, _),
    ):
        registered = await events.wait_for("registered")
        await events.wait_for(
            "report_ack",
            status="delivered",
            count=BACKLOG_TASKS,
            timeout_s=scaled(30),
        )

    assert events.matching("error", error="rate_limited") == []
    assert events.matching("disconnected") == []
    assert registered["max_frames_per_s"] == HUB_FRAMES_PER_S
    for message_id in message_ids:
        message = await load_message(session_factory, message_id)
        assert message.status == MessageStatus.DELIVERED.value


class RecordingHub:
    """A fake hub that acknowledges every frame and records when each one arrived."""

    def __init__(self, ack_fields: dict[str, Any]) -> None:
        self.ack_fields = ack_fields
        self.frames: list[tuple[float, dict[str, Any]]] = []

    async def __call__(self, socket: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        async for raw in socket:
            frame = orjson.loads(raw)
            self.frames.append((loop.time(), frame))
            if frame["type"] == "register":
                reply = {"type": "ack", "of": "register", **self.ack_fields}
            elif frame["type"] == "ping":
                reply = {"type": "pong"}
            else:
                reply = {
                    "type": "ack",
                    "of": frame["type"],
                    "request_id": frame.get("request_id"),
                    "sms_id": frame.get("sms_id"),
                }
            await socket.send(orjson.dumps(reply).decode())

    def max_frames_within(self, window_s: float) -> int:
        """Return the largest number of frames that arrived within any `window_s`."""
        times = [arrived_at for arrived_at, _ in self.frames]
        return max(
            sum(1 for other in times if start <= other < start + window_s)
            for start in times
        )


async def run_with_incoming(hub: RecordingHub, count: int, **config: Any) -> list[str]:
    """Run an agent against `hub`, upload `count` incoming SMS; return their sms_ids."""
    async with serve(hub, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}{WS_PATH}"
        async with running_agent(url, "mdk_any", fast_backend(), **config) as (
            agent,
            events,
            _,
        ):
            sms_ids = [
                agent.inject_incoming("+34600000002", f"SMS {n}") for n in range(count)
            ]
            await events.wait_for("incoming_ack", count=count, timeout_s=scaled(20))
    return sms_ids


async def test_agent_paces_at_announced_rate() -> None:
    hub = RecordingHub({"max_frames_per_s": 5})

    sms_ids = await run_with_incoming(hub, 20)

    uploaded = [frame["sms_id"] for _, frame in hub.frames if "sms_id" in frame]
    assert uploaded == sms_ids
    # One second's worth may go at once, then one frame every 1/5 s.
    assert hub.max_frames_within(1.0) <= 2 * 5
    assert hub.frames[-1][0] - hub.frames[0][0] >= (21 - 5 - 1) / 5


async def test_agent_paces_at_option_rate() -> None:
    hub = RecordingHub({})

    await run_with_incoming(hub, 12, max_frames_per_s=4)

    assert hub.max_frames_within(1.0) <= 2 * 4
    assert hub.frames[-1][0] - hub.frames[0][0] >= (13 - 4 - 1) / 4


async def test_option_lowers_announced_rate() -> None:
    hub = RecordingHub({"max_frames_per_s": 50})

    await run_with_incoming(hub, 12, max_frames_per_s=4)

    assert hub.frames[-1][0] - hub.frames[0][0] >= (13 - 4 - 1) / 4


# Frames that the agent wrote before it read a `rate_limited` error still reach the hub
# after the error left it. On the machine the test was written on, they arrived well
# within this time (an estimate, not a bound).
IN_FLIGHT_S = 0.1
# The hub admits bursts of 25 frames at 5 a second, and the agent sends 4 times as fast,
# so rejections come in short runs that stay under DEVICE_FRAME_FLOOD_MAX_ERRORS.
LIMITED_HUB_FRAMES_PER_S = 5
LIMITED_AGENT_FRAMES_PER_S = 20
RATE_LIMITED_INCOMING = 40


class UnannouncedRateRelay:
    """Relays each connection to a real hub, removing `max_frames_per_s` from the
    register ack as a hub from before that field would, and records every frame with
    its event-loop time."""

    def __init__(self, hub_url: str) -> None:
        self.hub_url = hub_url
        self.to_hub: list[tuple[float, dict[str, Any]]] = []
        self.to_phone: list[tuple[float, dict[str, Any]]] = []

    async def __call__(self, phone: ServerConnection) -> None:
        assert phone.request is not None
        query = phone.request.path.partition("?")[2]
        async with connect(f"{self.hub_url}?{query}", compression=None) as hub:
            await asyncio.gather(
                self._forward(phone, hub, self.to_hub),
                self._forward(hub, phone, self.to_phone),
                return_exceptions=True,
            )

    async def _forward(
        self,
        source: ServerConnection | ClientConnection,
        target: ServerConnection | ClientConnection,
        frames: list[tuple[float, dict[str, Any]]],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for raw in source:
                frame = orjson.loads(raw)
                frames.append((loop.time(), frame))
                if frame.get("of") == "register":
                    frame.pop("max_frames_per_s", None)
                await target.send(orjson.dumps(frame).decode())
        finally:
            code = source.close_code
            if code is None or code in (1005, 1006):
                code = 1000
            await target.close(code, source.close_reason or "")


async def test_rate_limited_agent_waits_retry_after(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    limited = settings.model_copy(
        update={"DEVICE_FRAMES_PER_SECOND": LIMITED_HUB_FRAMES_PER_S}
    )
    _, user_id, api_key = await create_device(session_factory)

    async with serve_hub_on(limited, free_port()) as hub_url:
        relay = UnannouncedRateRelay(hub_url)
        async with serve(relay, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}{WS_PATH}"
            async with running_agent(
                url,
                api_key,
                fast_backend(),
                max_frames_per_s=LIMITED_AGENT_FRAMES_PER_S,
            ) as (agent, events, _):
                await events.wait_for("registered")
                for number in range(RATE_LIMITED_INCOMING):
                    agent.inject_incoming("+34600000002", f"SMS {number}")
                await events.wait_for(
                    "incoming_ack", count=RATE_LIMITED_INCOMING, timeout_s=scaled(30)
                )

    errors = [
        (sent_at, frame)
        for sent_at, frame in relay.to_phone
        if frame.get("error") == "rate_limited"
    ]
    paused = events.matching("paused", error="rate_limited")
    assert errors
    assert events.matching("disconnected") == []
    assert len(paused) == len(errors)
    assert paused[0]["retry_after_s"] == errors[0][1]["retry_after"]
    for sent_at, error in errors:
        next_frames = [
            arrived_at
            for arrived_at, _ in relay.to_hub
            if arrived_at > sent_at + IN_FLIGHT_S
        ]
        assert next_frames
        assert next_frames[0] - sent_at >= error["retry_after"]
    async with session_factory() as db:
        stored = await db.scalar(
            select(func.count())
            .select_from(SMSMessage)
            .where(
                SMSMessage.user_id == user_id,
                SMSMessage.type == MessageType.INCOMING.value,
            )
        )
    assert stored == RATE_LIMITED_INCOMING
