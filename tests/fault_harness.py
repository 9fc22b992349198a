"""A fleet of simulated phones on the real device-hub, dispatcher and webhook-sender
processes, for the fault tests: start it, send through it, break it, and count the outcome.

Messages are written to Postgres and signalled to the dispatcher the way the API does,
so the API process is not needed. Every phone is an in-process device agent whose sends
are counted per message across the fleet, which is how duplicates are found.
"""

import asyncio
import collections
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from service_processes import Child, ProcessGroup, service_environment, wait_for_healthz
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_agent import (
    Agent,
    AgentConfig,
    EventRecorder,
    SendingBackend,
    SendOutcome,
)
from mensajero_common import queues
from mensajero_common.apikeys import display_prefix, generate_api_key, hash_api_key
from mensajero_common.keys import RedisKeys
from mensajero_common.models import (
    MessageStatus,
    MessageType,
    SMSDevice,
    SMSMessage,
    User,
    WebhookConfig,
    WebhookDelivery,
    WebhookDeliveryStatus,
)
from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, scaled
from mensajero_common.webhooks import (
    EVENT_SMS_DELIVERED,
    EVENT_SMS_FAILED,
    EVENT_SMS_SENT,
)

Sessions = async_sessionmaker[AsyncSession]

FINAL = (MessageStatus.DELIVERED, MessageStatus.FAILED, MessageStatus.EXPIRED)
WS_PATH = "/api/v1/android/ws"


@dataclass(frozen=True)
class FaultScale:
    """How big one fault run is: MENSAJERO_FAULT_SCALE=full gives the sizes of the
    fault suite (`make faults`), anything else a short run for every `make test`."""

    messages: int
    devices: int
    send_delay_ms: float

    @classmethod
    def from_environment(cls) -> "FaultScale":
        if os.environ.get("MENSAJERO_FAULT_SCALE") == "full":
            return cls(messages=500, devices=20, send_delay_ms=150)
        return cls(messages=60, devices=4, send_delay_ms=100)


def stack_environment(settings: Settings, hub_port: int) -> dict[str, str]:
    """Return the services' environment, with the reliability timers shortened so that
    a fault heals within seconds."""
    return service_environment(
        settings,
        HUB_HOST="127.0.0.1",
        HUB_PORT=hub_port,
        DISPATCHER_OPS_PORT=free_port(),
        WEBHOOKS_OPS_PORT=free_port(),
        DISPATCHER_SWEEP_INTERVAL=1,
        MESSAGE_CHECK_INTERVAL_S=0.5,
        MESSAGE_RETRY_DELAY_S=0.5,
        TASK_ACK_TIMEOUT_S=5,
        # Phones ping every second, so a live one's heartbeat is at most 2.5 s old and
        # never taken for a silent one's (TASK_ACK_TIMEOUT_S).
        WEBSOCKET_PING_INTERVAL=1,
        RECOVERY_STALE_AFTER_S=3,
        WEBHOOK_SWEEP_INTERVAL_S=1,
        WEBHOOK_RETRY_BASE_DELAY_S=0.5,
        WEBHOOK_TIMEOUT_S=5,
        WEBHOOK_ALLOW_PRIVATE_URLS="true",
        DEVICE_SMS_PER_MINUTE=100_000,
        DEVICE_FRAMES_PER_SECOND=10_000,
    )


class CountingBackend(SendingBackend):
    """Sends one SMS at a time, like a phone's modem, and counts every send of each
    message, fleet-wide. While `gate` is closed, sends wait after their claim."""

    def __init__(self, sends: collections.Counter[str], send_delay_ms: float) -> None:
        self.sends = sends
        self.send_delay_ms = send_delay_ms
        self.gate = asyncio.Event()
        self.gate.set()
        # Set, every send fails before anything goes out, like a SIM without service.
        self.failing = False
        self.failures = 0
        self._modem = asyncio.Lock()

    async def send(self, task: dict[str, Any]) -> SendOutcome:
        await self.gate.wait()
        async with self._modem:
            await asyncio.sleep(self.send_delay_ms / 1000)
            if self.failing:
                self.failures += 1
                return SendOutcome.failed("RESULT_ERROR_NO_SERVICE")
            self.sends[str(task["message_id"])] += 1
        return SendOutcome.sent()

    async def wait_for_delivery(self, task: dict[str, Any]) -> SendOutcome | None:
        await asyncio.sleep(self.send_delay_ms / 1000)
        return SendOutcome("delivered")


@dataclass
class Phone:
    device_id: uuid.UUID
    api_key: str
    agent: Agent
    events: EventRecorder
    backend: CountingBackend
    task: "asyncio.Task[None] | None" = None


@dataclass
class FaultStack:
    settings: Settings
    sessions: Sessions
    processes: ProcessGroup
    hub_port: int
    env: dict[str, str]
    children: dict[str, Child] = field(default_factory=dict)
    phones: list[Phone] = field(default_factory=list)
    sends: collections.Counter[str] = field(default_factory=collections.Counter)
    user_id: uuid.UUID | None = None
    restarts: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.settings.REDIS_KEY_PREFIX)

    @property
    def hub_url(self) -> str:
        return f"ws://127.0.0.1:{self.hub_port}{WS_PATH}"

    # Processes.

    async def start(self, name: str) -> Child:
        """Start one service (hub, dispatcher or webhooks), healthy."""
        script = {
            "hub": "mensajero-hub",
            "dispatcher": "mensajero-dispatcher",
            "webhooks": "mensajero-webhooks",
        }[name]
        label = f"{name}-{self.restarts[name]}"
        self.restarts[name] += 1
        child = await self.processes.start(label, [script], self.env)
        self.children[name] = child
        if name == "hub":
            async with httpx.AsyncClient(timeout=scaled(5)) as client:
                await wait_for_healthz(
                    client, f"http://127.0.0.1:{self.hub_port}", child
                )
        return child

    async def kill(self, name: str) -> None:
        """Kill a service with SIGKILL, as a crash or an OOM kill would."""
        child = self.children[name]
        os.killpg(child.process.pid, 9)
        await child.process.wait()

    async def terminate(self, name: str) -> int:
        """Stop a service with SIGTERM and return its exit code."""
        child = self.children[name]
        child.process.terminate()
        return await asyncio.wait_for(child.process.wait(), scaled(30))

    # Fleet.

    async def create_fleet(self, devices: int, send_delay_ms: float) -> None:
        async with self.sessions() as db:
            user = User(email=f"{uuid.uuid4().hex}@example.com", hashed_password="x")
            db.add(user)
            await db.flush()
            self.user_id = user.id
            keys = []
            for index in range(devices):
                api_key = generate_api_key("mdk_")
                device = SMSDevice(
                    user_id=user.id,
                    name=f"phone {index}",
                    api_key_hash=hash_api_key(api_key),
                    api_key_prefix=display_prefix(api_key),
                )
                db.add(device)
                await db.flush()
                keys.append((device.id, api_key))
            await db.commit()

        for device_id, api_key in keys:
            recorder = EventRecorder()
            backend = CountingBackend(self.sends, send_delay_ms)
            agent = Agent(
                AgentConfig(
                    url=self.hub_url,
                    api_key=api_key,
                    backoff_initial_s=0.1,
                    backoff_max_s=1.0,
                ),
                backend,
                on_event=recorder,
                seed=len(self.phones),
            )
            self.phones.append(Phone(device_id, api_key, agent, recorder, backend))

    async def start_phones(self) -> None:
        for phone in self.phones:
            phone.task = asyncio.create_task(phone.agent.run())
        async with asyncio.timeout(scaled(20)):
            for phone in self.phones:
                await phone.agent.registered.wait()
        await self.wait_online()

    async def wait_online(self) -> None:
        # The dispatcher assigns only to devices marked online in Postgres.
        async with asyncio.timeout(scaled(20)):
            while await self._online_count() < len(self.phones):  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    async def _online_count(self) -> int:
        async with self.sessions() as db:
            count = await db.scalar(
                select(func.count()).where(
                    SMSDevice.user_id == self.user_id, SMSDevice.status == "online"
                )
            )
            return int(count or 0)

    async def stop_phones(self) -> None:
        for phone in self.phones:
            await phone.agent.stop()
        await asyncio.gather(
            *(phone.task for phone in self.phones if phone.task is not None),
            return_exceptions=True,
        )

    async def subscribe_webhook(self, url: str) -> None:
        async with self.sessions() as db:
            db.add(
                WebhookConfig(
                    user_id=self.user_id,
                    url=url,
                    secret_key="fault-test-secret",
                    events=[EVENT_SMS_SENT, EVENT_SMS_DELIVERED, EVENT_SMS_FAILED],
                )
            )
            await db.commit()

    # Messages.

    async def send(self, redis: Any, count: int) -> list[uuid.UUID]:
        """Insert `count` pending messages and signal them, as the API does."""
        ids = [uuid.uuid4() for _ in range(count)]
        async with self.sessions() as db:
            for message_id in ids:
                db.add(
                    SMSMessage(
                        id=message_id,
                        user_id=self.user_id,
                        type=MessageType.OUTGOING.value,
                        status=MessageStatus.PENDING.value,
                        to_number="+34600000001",
                        body="Prueba de fallos",
                        segments=1,
                        encoding="gsm7",
                    )
                )
            await db.commit()
        await queues.signal_new_messages(redis, self.keys, ids)
        return ids

    async def statuses(self, ids: list[uuid.UUID]) -> collections.Counter[str]:
        async with self.sessions() as db:
            rows = await db.execute(
                select(SMSMessage.status, func.count())
                .where(SMSMessage.id.in_(ids))
                .group_by(SMSMessage.status)
            )
            return collections.Counter({status: count for status, count in rows.all()})

    async def wait_until_final_share(self, ids: list[uuid.UUID], share: float) -> None:
        async with asyncio.timeout(scaled(60)):
            while True:
                counts = await self.statuses(ids)
                if sum(counts[status] for status in FINAL) >= share * len(ids):
                    return
                await asyncio.sleep(0.05)

    async def drain(self, ids: list[uuid.UUID], timeout_s: float = 90) -> float:
        """Wait until every message is final; return how long it took."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(scaled(timeout_s)):
                while True:
                    counts = await self.statuses(ids)
                    if sum(counts[status] for status in FINAL) == len(ids):
                        return time.monotonic() - started
                    await asyncio.sleep(0.1)
        except TimeoutError:
            return float("inf")

    async def pending_deliveries(self) -> int:
        async with self.sessions() as db:
            count = await db.scalar(
                select(func.count()).where(
                    WebhookDelivery.user_id == self.user_id,
                    WebhookDelivery.status != WebhookDeliveryStatus.SUCCEEDED.value,
                )
            )
            return int(count or 0)

    async def succeeded_deliveries(self) -> int:
        async with self.sessions() as db:
            count = await db.scalar(
                select(func.count()).where(
                    WebhookDelivery.user_id == self.user_id,
                    WebhookDelivery.status == WebhookDeliveryStatus.SUCCEEDED.value,
                )
            )
            return int(count or 0)


@dataclass(frozen=True)
class FaultReport:
    name: str
    total: int
    counts: collections.Counter[str]
    # Messages whose SMS the fleet sent more than once, and the extra sends.
    duplicated: int
    extra_sends: int
    drain_s: float

    @property
    def lost(self) -> int:
        return self.total - sum(self.counts[status] for status in FINAL)

    def table(self) -> str:
        header = "| case | messages | sent | delivered | failed | lost | duplicated | drain s |"
        rule = "|---|---|---|---|---|---|---|---|"
        row = (
            f"| {self.name} | {self.total} | {self.counts['sent']} | "
            f"{self.counts['delivered']} | {self.counts['failed']} | {self.lost} | "
            f"{self.duplicated} ({self.extra_sends} extra sends) | {self.drain_s:.1f} |"
        )
        return "\n".join([header, rule, row])


async def summarize(
    stack: FaultStack, name: str, ids: list[uuid.UUID], drain_s: float
) -> FaultReport:
    counts = await stack.statuses(ids)
    wanted = {str(message_id) for message_id in ids}
    repeats = [
        count - 1 for key, count in stack.sends.items() if key in wanted and count > 1
    ]
    report = FaultReport(name, len(ids), counts, len(repeats), sum(repeats), drain_s)
    print()
    print(report.table())
    return report
