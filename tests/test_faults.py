"""Fault tests: real device-hub, dispatcher and webhook-sender processes, a fleet of
simulated phones, and a fault in the middle of the traffic. Each prints a table of the
outcome; no message may be lost.

`make test` runs them at a short scale. `make faults` runs them at full scale, with 500
messages over 20 phones, and adds the webhook-sender crash, whose leases take 30 s to
lapse.
"""

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fault_harness import (
    FaultScale,
    FaultStack,
    stack_environment,
    summarize,
)
from redis.asyncio import Redis
from service_processes import ProcessGroup
from sqlalchemy import make_url, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from websockets.asyncio.client import connect

from mensajero_common import jsonutil
from mensajero_common.models import (
    AttemptStatus,
    DeviceStatus,
    MessageStatus,
    SMSDevice,
    SMSMessage,
    SMSMessageAttempt,
)
from mensajero_common.protocol import CLOSE_SERVICE_RESTART
from mensajero_common.settings import Settings
from mensajero_common.testing import (
    PostgresProxy,
    WebhookReceiver,
    free_port,
    scaled,
    serve_app,
)

pytestmark = pytest.mark.e2e

SCALE = FaultScale.from_environment()
FULL_SCALE = os.environ.get("MENSAJERO_FAULT_SCALE") == "full"
# Share of the messages that must be final before the fault strikes.
HALFWAY = 0.4


@pytest.fixture
async def stack(
    settings: Settings,
    session_factory: async_sessionmaker[AsyncSession],
    redis: Redis,
    processes: ProcessGroup,
) -> AsyncIterator[FaultStack]:
    hub_port = free_port()
    stack = FaultStack(
        settings=settings,
        sessions=session_factory,
        processes=processes,
        hub_port=hub_port,
        env=stack_environment(settings, hub_port),
    )
    await stack.start("hub")
    await stack.start("dispatcher")
    await stack.create_fleet(SCALE.devices, SCALE.send_delay_ms)
    await stack.start_phones()
    try:
        yield stack
    finally:
        await stack.stop_phones()


async def _wipe_redis(redis: Redis, prefix: str) -> int:
    """Delete every key of the test, as a Redis restart without persistence would."""
    deleted = 0
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        deleted += await redis.delete(key)
    return deleted


def _assert_nothing_lost(report) -> None:
    assert report.lost == 0, report.table()
    assert report.counts[MessageStatus.DELIVERED] == report.total, report.table()
    # Phones claim each task before sending it, so a moved task goes out once.
    assert report.duplicated == 0, report.table()


async def test_hub_killed_midway(stack: FaultStack, redis: Redis) -> None:
    ids = await stack.send(redis, SCALE.messages)
    await stack.wait_until_final_share(ids, HALFWAY)

    await stack.kill("hub")
    await stack.start("hub")
    drain_s = await stack.drain(ids)

    _assert_nothing_lost(await summarize(stack, "hub kill -9", ids, drain_s))


async def test_dispatcher_killed_midway(stack: FaultStack, redis: Redis) -> None:
    ids = await stack.send(redis, SCALE.messages)
    await stack.wait_until_final_share(ids, HALFWAY)

    await stack.kill("dispatcher")
    # Messages sent while no dispatcher runs wait in Postgres and in the stream.
    later = await stack.send(redis, SCALE.messages // 4)
    await asyncio.sleep(0.5)
    await stack.start("dispatcher")
    drain_s = await stack.drain(ids + later)

    _assert_nothing_lost(
        await summarize(stack, "dispatcher kill -9", ids + later, drain_s)
    )


async def test_redis_wiped_midway(stack: FaultStack, redis: Redis) -> None:
    ids = await stack.send(redis, SCALE.messages)
    await stack.wait_until_final_share(ids, HALFWAY)
    # With the hub down, new tasks pile up in the device streams and nowhere else.
    await stack.kill("hub")
    queued = await stack.send(redis, SCALE.messages // 2)
    async with asyncio.timeout(scaled(20)):
        while (await stack.statuses(queued))[MessageStatus.ASSIGNED] < len(queued):  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    deleted = await _wipe_redis(redis, stack.settings.REDIS_KEY_PREFIX)
    await stack.start("hub")
    drain_s = await stack.drain(ids + queued)

    assert deleted > 0
    _assert_nothing_lost(await summarize(stack, "redis wiped", ids + queued, drain_s))


async def test_hub_sigterm_keeps_tasks(stack: FaultStack, redis: Redis) -> None:
    for phone in stack.phones:
        phone.backend.gate.clear()
    ids = await stack.send(redis, SCALE.devices * 2)
    async with asyncio.timeout(scaled(20)):
        while (await stack.statuses(ids))[MessageStatus.SENDING] < len(ids):  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    exit_code = await stack.terminate("hub")
    hub_log = stack.children["hub"].log_path.read_bytes()
    queued = 0
    for phone in stack.phones:
        queued += await redis.xlen(stack.keys.device_tasks_stream(phone.device_id))
    async with stack.sessions() as db:
        statuses = set(
            await db.scalars(
                select(SMSDevice.status).where(SMSDevice.user_id == stack.user_id)
            )
        )
    closes = [
        phone.events.matching("disconnected", code=CLOSE_SERVICE_RESTART)
        for phone in stack.phones
    ]
    await stack.start("hub")
    await stack.wait_online()
    for phone in stack.phones:
        phone.backend.gate.set()
    drain_s = await stack.drain(ids)

    # uvicorn raises SIGTERM again once its graceful shutdown is over, so the exit
    # status names the signal.
    assert exit_code in (0, -15)
    assert b'"device hub stopped"' in hub_log
    assert all(closes), "every phone got close code 1012"
    assert queued == len(ids), "unreported tasks stay in their streams"
    assert statuses == {DeviceStatus.OFFLINE}
    _assert_nothing_lost(await summarize(stack, "hub SIGTERM", ids, drain_s))


async def test_phone_gone_mid_task(stack: FaultStack, redis: Redis) -> None:
    # One phone leaves for good with tasks it never acknowledged: after
    # TASK_ACK_TIMEOUT_S they move to the other phones.
    gone = stack.phones[0]
    gone.backend.gate.clear()
    await gone.agent.stop()
    ids = await stack.send(redis, SCALE.messages)
    await asyncio.sleep(0.5)
    async with stack.sessions() as db:
        await db.execute(
            SMSDevice.__table__.update()
            .where(SMSDevice.id == gone.device_id)
            .values(status=DeviceStatus.ONLINE.value)
        )
        await db.commit()
    stranded = await stack.send(redis, SCALE.devices * 3)
    drain_s = await stack.drain(ids + stranded)

    report = await summarize(stack, "phone gone", ids + stranded, drain_s)
    _assert_nothing_lost(report)
    async with stack.sessions() as db:
        on_gone = await db.scalar(
            select(SMSMessage.id).where(SMSMessage.device_id == gone.device_id).limit(1)
        )
    assert on_gone is None, "no message stays on the phone that left"


async def test_bad_reports_change_nothing(stack: FaultStack, redis: Redis) -> None:
    ids = await stack.send(redis, SCALE.devices)
    await stack.drain(ids)
    stranger = stack.phones[-1]
    await stranger.agent.stop()
    async with stack.sessions() as db:
        owned = await db.scalar(
            select(SMSMessage.id).where(
                SMSMessage.id.in_(ids), SMSMessage.device_id != stranger.device_id
            )
        )
    url = f"{stack.hub_url}?api_key={stranger.api_key}"

    replies = []
    async with connect(url, compression=None) as socket:
        for frame in (
            "{not json",
            jsonutil.dumps_str({"type": "sms_report", "status": "sent"}),
            jsonutil.dumps_str(
                {"type": "sms_report", "message_id": str(owned), "status": "failed"}
            ),
            jsonutil.dumps_str(
                {
                    "type": "sms_report",
                    "message_id": str(uuid.uuid4()),
                    "status": "sent",
                }
            ),
        ):
            await socket.send(frame)
            async with asyncio.timeout(scaled(5)):
                while True:
                    reply = jsonutil.loads(await socket.recv())
                    if reply["type"] == "error":
                        replies.append(reply["error"])
                        break

    assert replies == [
        "invalid_frame",
        "invalid_frame",
        "report_not_allowed",
        "report_not_allowed",
    ]
    counts = await stack.statuses(ids)
    assert counts[MessageStatus.DELIVERED] == len(ids)


async def test_failing_phone_sends_retry_elsewhere(
    stack: FaultStack, redis: Redis
) -> None:
    broken = stack.phones[0]
    broken.backend.failing = True
    ids = await stack.send(redis, SCALE.messages)
    drain_s = await stack.drain(ids)

    report = await summarize(stack, "one phone failing", ids, drain_s)
    _assert_nothing_lost(report)
    assert broken.backend.failures > 0
    async with stack.sessions() as db:
        failed_there = list(
            await db.scalars(
                select(SMSMessageAttempt.message_id).where(
                    SMSMessageAttempt.device_id == broken.device_id,
                    SMSMessageAttempt.status == AttemptStatus.FAILED.value,
                )
            )
        )
        final_devices = set(
            await db.scalars(
                select(SMSMessage.device_id).where(SMSMessage.id.in_(failed_there))
            )
        )
    assert len(failed_there) == broken.backend.failures
    assert broken.device_id not in final_devices


async def test_postgres_outage_heals(
    settings: Settings,
    session_factory: async_sessionmaker[AsyncSession],
    redis: Redis,
    processes: ProcessGroup,
) -> None:
    # The services reach Postgres through a proxy that goes down for 10 s while
    # messages flow; the test itself writes to Postgres directly.
    url = make_url(settings.DATABASE_URL)
    outage = PostgresProxy(url.host or "127.0.0.1", url.port or 5432)
    await outage.start()
    hub_port = free_port()
    env = stack_environment(settings, hub_port)
    env["DATABASE_URL"] = url.set(port=outage.port).render_as_string(
        hide_password=False
    )
    stack = FaultStack(settings, session_factory, processes, hub_port, env)
    try:
        await stack.start("hub")
        await stack.start("dispatcher")
        await stack.create_fleet(SCALE.devices, SCALE.send_delay_ms)
        await stack.start_phones()
        ids = await stack.send(redis, SCALE.messages)
        await stack.wait_until_final_share(ids, HALFWAY)

        outage.cut()
        during = await stack.send(redis, SCALE.messages // 2)
        await asyncio.sleep(scaled(10))
        outage.restore()
        drain_s = await stack.drain(ids + during)

        report = await summarize(stack, "postgres down 10 s", ids + during, drain_s)
        _assert_nothing_lost(report)
        for name in ("hub", "dispatcher"):
            assert stack.children[name].process.returncode is None, f"{name} exited"
    finally:
        await stack.stop_phones()
        await outage.stop()


@pytest.mark.skipif(
    not FULL_SCALE, reason="waits out the 30 s delivery lease; run with make faults"
)
async def test_webhook_sender_killed_midway(
    stack: FaultStack, redis: Redis, tmp_path: Path
) -> None:
    receiver = WebhookReceiver()
    async with serve_app(receiver) as url:
        await stack.subscribe_webhook(url)
        await stack.start("webhooks")
        ids = await stack.send(redis, SCALE.messages)
        await stack.wait_until_final_share(ids, HALFWAY)

        await stack.kill("webhooks")
        await asyncio.sleep(1)
        await stack.start("webhooks")
        drain_s = await stack.drain(ids)
        # Deliveries leased by the killed worker wait for their lease (30 s past the
        # HTTP timeout), and its sweep job id stays taken in arq until the job timeout.
        async with asyncio.timeout(scaled(240)):
            while await stack.pending_deliveries() > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.5)

        report = await summarize(stack, "webhook-sender kill -9", ids, drain_s)
        _assert_nothing_lost(report)
        # Two events per delivered message: sms_sent and sms_delivered.
        assert await stack.succeeded_deliveries() == 2 * len(ids)
        delivered_events = {
            (body["message_id"], body["event"])
            for _, raw, _ in receiver.requests
            for body in [jsonutil.loads(raw)]
        }
        assert len(delivered_events) == 2 * len(ids)
