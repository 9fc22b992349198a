import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from arq.connections import ArqRedis
from hub_helpers import DeviceRecord, create_device, create_outgoing, load_message
from redis.asyncio import Redis
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from mensajero_common import protocol, queues
from mensajero_common.keys import RedisKeys
from mensajero_common.message_attempts import start_attempts
from mensajero_common.models import (
    MessageStatus,
    SMSMessage,
    SMSMessageAttempt,
    WebhookConfig,
    WebhookEvent,
)
from mensajero_common.protocol import SmsReportFrame
from mensajero_common.settings import Settings
from mensajero_common.webhooks import EVENTS
from mensajero_hub.core.frames import FrameRejectedError
from mensajero_hub.core.hub import create_hub_redis
from mensajero_hub.core.report_writer import ReportWriter
from mensajero_hub.core.reports import ReportOutcome

Sessions = async_sessionmaker[AsyncSession]

# A number that the trigger of `failing_number` rejects in Postgres.
FAILING_NUMBER = "+34699999999"


@pytest.fixture
async def hub_redis(settings: Settings) -> AsyncIterator[ArqRedis]:
    client = create_hub_redis(settings)
    yield client
    await client.aclose(close_connection_pool=True)


@pytest.fixture
async def writer(
    settings: Settings,
    session_factory: Sessions,
    hub_redis: ArqRedis,
    redis_keys: RedisKeys,
) -> AsyncIterator[ReportWriter]:
    reports = ReportWriter(settings, session_factory, hub_redis, redis_keys)
    reports.start()
    yield reports
    await reports.stop()


@pytest.fixture
def commits(engine: AsyncEngine) -> Iterator[list[int]]:
    """Count the transactions committed on the engine from now on."""
    counted: list[int] = []

    def count(_connection: Any) -> None:
        counted.append(1)

    event.listen(engine.sync_engine, "commit", count)
    yield counted
    event.remove(engine.sync_engine, "commit", count)


@pytest.fixture
async def failing_number(engine: AsyncEngine) -> AsyncIterator[str]:
    """Make Postgres reject every update of a message sent to FAILING_NUMBER."""
    async with engine.begin() as connection:
        await connection.execute(
            text(
                """
                CREATE FUNCTION reject_message_update() RETURNS trigger AS $$
                BEGIN
                    RAISE EXCEPTION 'update rejected by the test trigger';
                END
                $$ LANGUAGE plpgsql
                """
            )
        )
        await connection.execute(
            text(
                f"""
                CREATE TRIGGER reject_message_update BEFORE UPDATE ON smsmessage
                FOR EACH ROW WHEN (NEW.to_number = '{FAILING_NUMBER}')
                EXECUTE FUNCTION reject_message_update()
                """
            )
        )
    yield FAILING_NUMBER
    async with engine.begin() as connection:
        await connection.execute(
            text("DROP TRIGGER reject_message_update ON smsmessage")
        )
        await connection.execute(text("DROP FUNCTION reject_message_update()"))


def report_frame(message_id: uuid.UUID, status: str) -> SmsReportFrame:
    return SmsReportFrame(type="sms_report", message_id=message_id, status=status)


async def apply_all(
    writer: ReportWriter, reports: list[tuple[DeviceRecord, SmsReportFrame]]
) -> list[ReportOutcome | BaseException]:
    """Queue every report before the writer runs, so they share batches."""
    return await asyncio.gather(
        *(writer.apply(device.device_id, frame) for device, frame in reports),
        return_exceptions=True,
    )


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
    )
    await queues.push_device_task(redis, keys, device.device_id, message.id, frame)


async def subscribe_to_all(sessions: Sessions, user_id: uuid.UUID) -> None:
    async with sessions() as db:
        db.add(
            WebhookConfig(
                user_id=user_id,
                url="https://example.com/hook",
                secret_key="secret",
                events=list(EVENTS),
            )
        )
        await db.commit()


async def events_by_message(sessions: Sessions) -> dict[uuid.UUID, list[str]]:
    async with sessions() as db:
        rows = (
            await db.execute(
                select(WebhookEvent.message_id, WebhookEvent.event).order_by(
                    WebhookEvent.created_at
                )
            )
        ).all()
    found: dict[uuid.UUID, list[str]] = {}
    for message_id, name in rows:
        if message_id is not None:
            found.setdefault(message_id, []).append(name)
    return found


async def test_reports_of_many_phones_share_one_commit(
    writer: ReportWriter,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    commits: list[int],
) -> None:
    devices = [await create_device(session_factory) for _ in range(10)]
    for device in devices:
        await subscribe_to_all(session_factory, device.user_id)
    messages = [
        (device, await create_outgoing(session_factory, device))
        for device in devices
        for _ in range(3)
    ]
    for device, message in messages:
        await push_task(redis, redis_keys, device, message)
    commits.clear()

    sending = await apply_all(
        writer, [(device, report_frame(m.id, "sending")) for device, m in messages]
    )
    commits_for_sending = len(commits)
    sent = await apply_all(
        writer, [(device, report_frame(m.id, "sent")) for device, m in messages]
    )

    assert commits_for_sending == 1
    assert len(commits) == 2
    assert all(
        isinstance(outcome, ReportOutcome) and outcome.status is MessageStatus.SENDING
        for outcome in sending
    )
    assert all(
        isinstance(outcome, ReportOutcome) and outcome.status is MessageStatus.SENT
        for outcome in sent
    )
    for device, message in messages:
        assert (await load_message(session_factory, message.id)).status == "sent"
        stream = await redis.xrange(redis_keys.device_tasks_stream(device.device_id))
        assert stream == []
    events = await events_by_message(session_factory)
    assert {message.id: events.get(message.id) for _, message in messages} == {
        message.id: ["sms_sent"] for _, message in messages
    }


async def test_failing_report_spares_rest_of_batch(
    writer: ReportWriter,
    session_factory: Sessions,
    failing_number: str,
) -> None:
    devices = [await create_device(session_factory) for _ in range(4)]
    good = [await create_outgoing(session_factory, device) for device in devices]
    bad = await create_outgoing(session_factory, devices[0], to_number=failing_number)
    reports = [
        (device, report_frame(message.id, "sending"))
        for device, message in zip(devices, good, strict=True)
    ]
    reports.insert(2, (devices[0], report_frame(bad.id, "sending")))

    outcomes = await apply_all(writer, reports)

    bad_outcome = outcomes.pop(2)
    assert isinstance(bad_outcome, Exception)
    assert not isinstance(bad_outcome, FrameRejectedError)
    assert all(isinstance(outcome, ReportOutcome) for outcome in outcomes)
    assert (await load_message(session_factory, bad.id)).status == "assigned"
    for message in good:
        assert (await load_message(session_factory, message.id)).status == "sending"


async def test_rejected_report_spares_rest_of_batch(
    writer: ReportWriter, session_factory: Sessions, commits: list[int]
) -> None:
    device = await create_device(session_factory)
    other = await create_device(session_factory)
    mine = await create_outgoing(session_factory, device)
    theirs = await create_outgoing(session_factory, other)
    commits.clear()

    outcomes = await apply_all(
        writer,
        [
            (device, report_frame(theirs.id, "sending")),
            (device, report_frame(mine.id, "sending")),
        ],
    )

    rejected, applied = outcomes
    assert isinstance(rejected, FrameRejectedError)
    assert rejected.code == "report_not_allowed"
    assert isinstance(applied, ReportOutcome)
    assert applied.status is MessageStatus.SENDING
    assert len(commits) == 1
    assert (await load_message(session_factory, theirs.id)).status == "assigned"


async def test_reports_of_one_message_apply_in_order(
    writer: ReportWriter, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device.user_id)
    message = await create_outgoing(session_factory, device)

    outcomes = await apply_all(
        writer,
        [
            (device, report_frame(message.id, "sending")),
            (device, report_frame(message.id, "sent")),
            (device, report_frame(message.id, "delivered")),
        ],
    )

    statuses = [
        outcome.status for outcome in outcomes if isinstance(outcome, ReportOutcome)
    ]
    assert statuses == [
        MessageStatus.SENDING,
        MessageStatus.SENT,
        MessageStatus.DELIVERED,
    ]
    assert (await load_message(session_factory, message.id)).status == "delivered"
    events = await events_by_message(session_factory)
    assert events[message.id] == ["sms_sent", "sms_delivered"]


async def test_delivered_skipping_sent_adds_sms_sent(
    writer: ReportWriter, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    async with session_factory() as db:
        db.add(
            WebhookConfig(
                user_id=device.user_id,
                url="https://example.com/hook",
                secret_key="secret",
                events=["sms_sent"],
            )
        )
        await db.commit()
    messages = [await create_outgoing(session_factory, device) for _ in range(2)]

    # Plain forward moves: `delivered` straight after `sending`, with no `sent`.
    for status in ("sending", "delivered"):
        outcomes = await apply_all(
            writer, [(device, report_frame(m.id, status)) for m in messages]
        )
        assert all(isinstance(outcome, ReportOutcome) for outcome in outcomes)

    async with session_factory() as db:
        rows = (
            await db.execute(
                select(WebhookEvent.message_id, WebhookEvent.event, WebhookEvent.body)
            )
        ).all()
    assert sorted((row.message_id, row.event) for row in rows) == sorted(
        (message.id, "sms_sent") for message in messages
    )
    for row in rows:
        assert json.loads(row.body)["status"] == "sent"
    for message in messages:
        stored = await load_message(session_factory, message.id)
        assert stored.status == "delivered"
        assert stored.sent_at is not None
        assert stored.sent_at <= stored.delivered_at


async def test_delivered_part_adds_sms_sent(
    writer: ReportWriter, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    await subscribe_to_all(session_factory, device.user_id)
    message = await create_outgoing(session_factory, device)

    for status in ("sending", "delivered"):
        (outcome,) = await apply_all(
            writer,
            [
                (
                    device,
                    SmsReportFrame(
                        type="sms_report",
                        message_id=message.id,
                        status=status,
                        part=1 if status == "delivered" else None,
                        parts=1 if status == "delivered" else None,
                    ),
                )
            ],
        )
        assert isinstance(outcome, ReportOutcome)

    events = await events_by_message(session_factory)
    assert sorted(events[message.id]) == ["sms_delivered", "sms_sent"]
    stored = await load_message(session_factory, message.id)
    assert stored.status == "delivered"
    assert stored.sent_at is not None


async def test_writer_applies_queued_reports_on_stop(
    settings: Settings,
    session_factory: Sessions,
    hub_redis: ArqRedis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)
    writer = ReportWriter(settings, session_factory, hub_redis, redis_keys)
    writer.start()

    pending = asyncio.create_task(
        writer.apply(device.device_id, report_frame(message.id, "sending"))
    )
    await asyncio.sleep(0)
    await writer.stop()

    outcome = await pending
    assert outcome.status is MessageStatus.SENDING
    assert (await load_message(session_factory, message.id)).status == "sending"


async def test_batch_moves_attempt_rows_forward(
    writer: ReportWriter, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    with_row = [await create_outgoing(session_factory, device) for _ in range(3)]
    without_row = await create_outgoing(session_factory, device)
    async with session_factory() as db:
        await start_attempts(db, [(m.id, 1, device.device_id) for m in with_row])
        await db.commit()
    messages = [*with_row, without_row]

    for status in ("sending", "sent", "delivered"):
        await apply_all(
            writer, [(device, report_frame(m.id, status)) for m in messages]
        )
    late = await apply_all(writer, [(device, report_frame(with_row[0].id, "sent"))])

    async with session_factory() as db:
        rows = (
            await db.scalars(
                select(SMSMessageAttempt).where(
                    SMSMessageAttempt.message_id.in_([m.id for m in messages])
                )
            )
        ).all()
    assert len(rows) == len(messages)
    for row in rows:
        assert row.status == "delivered"
        assert row.acknowledged_at is not None
        assert row.ended_at is not None
    (late_outcome,) = late
    assert isinstance(late_outcome, ReportOutcome)
    assert late_outcome.status is MessageStatus.DELIVERED
    assert late_outcome.change is None


async def test_events_recorded_only_where_subscribed(
    writer: ReportWriter, session_factory: Sessions, engine: AsyncEngine
) -> None:
    subscribed = await create_device(session_factory)
    async with session_factory() as db:
        db.add(
            WebhookConfig(
                user_id=subscribed.user_id,
                url="https://example.com/hook",
                secret_key="secret",
                events=["sms_delivered"],
            )
        )
        await db.commit()
    unsubscribed = await create_device(session_factory)
    messages = [
        (device, await create_outgoing(session_factory, device))
        for device in (subscribed, unsubscribed)
    ]
    event_statements: list[str] = []

    def record(*args: Any) -> None:
        if "INSERT INTO webhookevent" in str(args[2]):
            event_statements.append(str(args[2]))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        for status in ("sending", "sent", "delivered"):
            await apply_all(
                writer, [(device, report_frame(m.id, status)) for device, m in messages]
            )
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)

    events = await events_by_message(session_factory)
    assert events == {messages[0][1].id: ["sms_delivered"]}
    assert len(event_statements) == 1
