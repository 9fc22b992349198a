import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, text, update

from mensajero_common import jsonutil, message_attempts
from mensajero_common.db import session_scope
from mensajero_common.models import (
    AttemptStatus,
    DeviceStatus,
    MessageStatus,
    SMSDevice,
    SMSMessage,
    WebhookConfig,
    WebhookEvent,
)
from mensajero_common.testing import scaled
from mensajero_common.webhooks import EVENT_SMS_FAILED
from mensajero_dispatcher.attempts.service import (
    end_tasks_of_deleted_devices,
    expire_messages,
    fail_unreported_tasks,
    move_unacknowledged_tasks,
)
from mensajero_dispatcher.devices.service import handle_device_event
from mensajero_dispatcher.messages.service import (
    REQUESTED_DEVICE_DELETED,
    assign_due_retries,
    assign_messages,
    assign_pending_messages,
)
from mensajero_dispatcher.scheduler import default_jobs


async def _tasks(ctx, device_id):
    entries = await ctx.redis.xrange(ctx.keys.device_tasks_stream(device_id))
    return [jsonutil.loads(fields[b"task"]) for _, fields in entries]


async def _fail_attempt(ctx, factory, message, *, retryable=True, error="NO_SERVICE"):
    """Apply a `failed` report the way the hub does, in one transaction."""
    async with session_scope(ctx.session_factory) as session:
        locked = await message_attempts.lock_message(session, message.id)
        assert locked is not None
        return await message_attempts.fail_attempt(
            session, ctx.settings, locked, error, retryable=retryable
        )


async def _make_due(ctx, message):
    """End the retry delay of a message now."""
    async with session_scope(ctx.session_factory) as session:
        await session.execute(
            update(SMSMessage)
            .where(SMSMessage.id == message.id)
            .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=1))
        )


async def _subscribe_to_failures(session_factory, user):
    async with session_factory() as session:
        session.add(
            WebhookConfig(
                user_id=user.id,
                url="https://example.com/hook",
                secret_key="secret",
                events=[EVENT_SMS_FAILED],
            )
        )
        await session.commit()


async def _failure_events(session_factory, message):
    async with session_factory() as session:
        rows = await session.scalars(
            select(WebhookEvent).where(WebhookEvent.message_id == message.id)
        )
        return [jsonutil.loads(row.body) for row in rows]


async def test_failed_attempt_waits_then_retries_elsewhere(ctx, factory):
    user = await factory.user()
    first = await factory.device(user)
    second = await factory.device(user)
    message = await factory.message(user)
    plan = await assign_messages(ctx, [message.id])
    tried = plan.assignments[0].device_id
    other = second.id if tried == first.id else first.id

    end = await _fail_attempt(ctx, factory, message)
    early = await assign_due_retries(ctx)
    waiting = await factory.reload(message)
    await _make_due(ctx, message)
    retried = await assign_due_retries(ctx)

    assert end.status == MessageStatus.PENDING
    assert end.delivery_ids == []
    assert early == 0
    assert waiting.status == MessageStatus.PENDING
    assert waiting.error == "NO_SERVICE"
    assert waiting.next_attempt_at is not None
    assert retried == 1
    stored = await factory.reload(message)
    assert stored.status == MessageStatus.ASSIGNED
    assert stored.device_id == other
    assert stored.attempts == 2
    assert stored.next_attempt_at is None
    attempts = await factory.attempts(message)
    assert [(row.attempt_number, row.status) for row in attempts] == [
        (1, AttemptStatus.FAILED),
        (2, AttemptStatus.ASSIGNED),
    ]
    assert attempts[0].device_id == tried
    assert attempts[0].error == "NO_SERVICE"
    assert attempts[0].ended_at is not None
    assert [task["attempt"] for task in await _tasks(ctx, other)] == [2]


async def test_retry_reuses_only_device_online(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    message = await factory.message(user)
    await assign_messages(ctx, [message.id])
    await _fail_attempt(ctx, factory, message)

    await _make_due(ctx, message)
    await assign_due_retries(ctx)

    stored = await factory.reload(message)
    assert stored.device_id == device.id
    assert stored.attempts == 2


async def test_last_failed_attempt_ends_message(ctx, factory, session_factory):
    user = await factory.user()
    await factory.quota(user, sms_sent_this_month=5)
    await _subscribe_to_failures(session_factory, user)
    device = await factory.device(user)
    message = await factory.message(
        user,
        status=MessageStatus.ASSIGNED,
        device=device,
        attempts=ctx.settings.MESSAGE_MAX_ATTEMPTS,
    )

    end = await _fail_attempt(ctx, factory, message, error="RADIO_OFF")

    stored = await factory.reload(message)
    assert end.status == MessageStatus.FAILED
    assert len(end.delivery_ids) == 1
    assert stored.status == MessageStatus.FAILED
    assert stored.error == "RADIO_OFF"
    assert stored.failed_at is not None
    assert stored.quota_refunded_at is not None
    assert await factory.sms_sent_this_month(user) == 4
    events = await _failure_events(session_factory, message)
    assert [(event["event"], event["error"]) for event in events] == [
        ("sms_failed", "RADIO_OFF")
    ]


async def test_unknown_outcome_is_never_retried(ctx, factory):
    user = await factory.user()
    await factory.quota(user, sms_sent_this_month=2)
    device = await factory.device(user)
    message = await factory.message(user, status=MessageStatus.SENDING, device=device)

    end = await _fail_attempt(ctx, factory, message, retryable=False)

    stored = await factory.reload(message)
    assert end.status == MessageStatus.FAILED
    assert stored.quota_refunded_at is None
    assert await factory.sms_sent_this_month(user) == 2


async def test_refund_only_once(ctx, factory):
    user = await factory.user()
    await factory.quota(user, sms_sent_this_month=3)
    message = await factory.message(user)

    async with session_scope(ctx.session_factory) as session:
        first = await message_attempts.refund_quota(session, message.id, user.id)
        second = await message_attempts.refund_quota(session, message.id, user.id)

    assert first is True
    assert second is False
    assert await factory.sms_sent_this_month(user) == 2


async def test_no_refund_after_quota_reset(ctx, factory, session_factory):
    user = await factory.user()
    await factory.quota(user, sms_sent_this_month=0)
    message = await factory.message(user, age_s=3 * 86400)
    async with session_factory() as session:
        await session.execute(
            text(
                "UPDATE userquota SET last_reset_date = current_date WHERE user_id = :u"
            ),
            {"u": user.id},
        )
        await session.commit()

    async with session_scope(ctx.session_factory) as session:
        refunded = await message_attempts.refund_quota(session, message.id, user.id)

    assert refunded is False
    assert (await factory.reload(message)).quota_refunded_at is None
    assert await factory.sms_sent_this_month(user) == 0


async def test_no_refund_when_reset_commits_first(ctx, factory, pg_connection):
    # The reset commits while the refund waits for the quota row's lock, after the
    # refund's snapshot was taken.
    user = await factory.user()
    await factory.quota(user, sms_sent_this_month=1)
    message = await factory.message(user, age_s=3 * 86400)
    await pg_connection.execute(
        "UPDATE userquota SET last_reset_date = current_date - 10 WHERE user_id = $1",
        user.id,
    )
    reset = pg_connection.transaction()
    await reset.start()
    # As the monthly reset, then five sends of the new period.
    await pg_connection.execute(
        "UPDATE userquota SET last_reset_date = current_date, sms_sent_this_month = 5 "
        "WHERE user_id = $1",
        user.id,
    )

    async def refund() -> bool:
        async with session_scope(ctx.session_factory) as session:
            return await message_attempts.refund_quota(session, message.id, user.id)

    refunding = asyncio.create_task(refund())
    async with asyncio.timeout(scaled(10)):
        while not await pg_connection.fetchval(  # noqa: ASYNC110
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ):
            await asyncio.sleep(0.02)
    await reset.commit()
    refunded = await refunding

    assert refunded is False
    assert await factory.sms_sent_this_month(user) == 5


async def test_retries_never_charge_again(ctx, factory):
    user = await factory.user()
    await factory.quota(user, sms_sent_this_month=1)
    await factory.device(user)
    message = await factory.message(user)

    for _ in range(ctx.settings.MESSAGE_MAX_ATTEMPTS - 1):
        await assign_messages(ctx, [message.id])
        await _fail_attempt(ctx, factory, message)
        await _make_due(ctx, message)
        assert await factory.sms_sent_this_month(user) == 1
    await assign_due_retries(ctx)
    end = await _fail_attempt(ctx, factory, message)

    assert end.status == MessageStatus.FAILED
    assert (await factory.reload(message)).attempts == ctx.settings.MESSAGE_MAX_ATTEMPTS
    # Charged once by the API, given back once when the last attempt failed.
    assert await factory.sms_sent_this_month(user) == 0


async def test_unacknowledged_task_moves(ctx, factory):
    user = await factory.user()
    silent = await factory.device(user, status=DeviceStatus.OFFLINE)
    online = await factory.device(user)
    message = await factory.message(
        user, status=MessageStatus.ASSIGNED, device=silent, age_s=3600
    )
    await ctx.redis.xadd(
        ctx.keys.device_tasks_stream(silent.id),
        {"message_id": str(message.id), "task": b"{}", "attempt": "1"},
    )

    moved = await move_unacknowledged_tasks(ctx)

    stored = await factory.reload(message)
    assert moved == 1
    assert stored.status == MessageStatus.ASSIGNED
    assert stored.device_id == online.id
    assert stored.attempts == 2
    assert await _tasks(ctx, silent.id) == []
    assert [task["attempt"] for task in await _tasks(ctx, online.id)] == [2]
    attempts = await factory.attempts(message)
    assert [(row.status, row.error) for row in attempts] == [
        (AttemptStatus.MOVED, "no_ack"),
        (AttemptStatus.ASSIGNED, None),
    ]


async def test_unacknowledged_task_stays_when_alone(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    lonely = await factory.message(
        user, status=MessageStatus.ASSIGNED, device=device, age_s=3600
    )
    other_user = await factory.user()
    asked = await factory.device(other_user, status=DeviceStatus.OFFLINE)
    await factory.device(other_user)
    requested = await factory.message(
        other_user, status=MessageStatus.ASSIGNED, requested_device=asked, age_s=3600
    )
    acknowledged = await factory.message(
        other_user, status=MessageStatus.SENDING, device=asked, age_s=3600
    )
    fresh = await factory.message(
        other_user, status=MessageStatus.ASSIGNED, device=asked
    )

    moved = await move_unacknowledged_tasks(ctx)

    assert moved == 0
    for message, device_id in (
        (lonely, device.id),
        (requested, asked.id),
        (acknowledged, asked.id),
        (fresh, asked.id),
    ):
        assert (await factory.reload(message)).device_id == device_id


async def test_live_device_keeps_slow_tasks(ctx, factory):
    user = await factory.user()
    busy = await factory.device(user)
    await factory.device(user)
    ack_timeout_s = ctx.settings.TASK_ACK_TIMEOUT_S
    slow = await factory.message(
        user, status=MessageStatus.ASSIGNED, device=busy, age_s=2 * ack_timeout_s
    )
    stuck = await factory.message(
        user, status=MessageStatus.ASSIGNED, device=busy, age_s=20 * ack_timeout_s
    )

    moved = await move_unacknowledged_tasks(ctx)

    assert moved == 1
    assert (await factory.reload(slow)).device_id == busy.id
    assert (await factory.reload(stuck)).device_id != busy.id


async def test_device_between_heartbeat_writes_keeps_tasks(ctx, factory):
    # The hub writes a live phone's heartbeat on every second ping, so the heartbeat can
    # be two and a half ping intervals old. A device is silent only after three.
    user = await factory.user()
    ping_interval_s = ctx.settings.WEBSOCKET_PING_INTERVAL
    now = datetime.now(UTC)
    live = await factory.device(
        user, last_heartbeat=now - timedelta(seconds=2.5 * ping_interval_s)
    )
    silent = await factory.device(
        user, last_heartbeat=now - timedelta(seconds=3.2 * ping_interval_s)
    )
    await factory.device(user)
    age_s = 2 * ctx.settings.TASK_ACK_TIMEOUT_S
    on_live = await factory.message(
        user, status=MessageStatus.ASSIGNED, device=live, age_s=age_s
    )
    on_silent = await factory.message(
        user, status=MessageStatus.ASSIGNED, device=silent, age_s=age_s
    )

    moved = await move_unacknowledged_tasks(ctx)

    assert moved == 1
    assert (await factory.reload(on_live)).device_id == live.id
    assert (await factory.reload(on_silent)).device_id != silent.id


async def test_device_online_pulls_stalled_tasks(ctx, factory):
    user = await factory.user()
    gone = await factory.device(user, status=DeviceStatus.OFFLINE)
    message = await factory.message(
        user, status=MessageStatus.ASSIGNED, device=gone, age_s=3600
    )
    returning = await factory.device(user)

    await handle_device_event(ctx, returning.id, "online")

    stored = await factory.reload(message)
    assert stored.device_id == returning.id
    assert stored.status == MessageStatus.ASSIGNED


async def test_unreported_task_fails_no_report(ctx, factory, session_factory):
    user = await factory.user()
    await factory.quota(user, sms_sent_this_month=1)
    await _subscribe_to_failures(session_factory, user)
    device = await factory.device(user)
    stuck = await factory.message(
        user, status=MessageStatus.SENDING, device=device, age_s=3600
    )
    recent = await factory.message(user, status=MessageStatus.SENDING, device=device)
    await ctx.redis.xadd(
        ctx.keys.device_tasks_stream(device.id),
        {"message_id": str(stuck.id), "task": b"{}", "attempt": "1"},
    )

    failed = await fail_unreported_tasks(ctx)

    stored = await factory.reload(stuck)
    assert failed == 1
    assert stored.status == MessageStatus.FAILED
    assert stored.error == "no_report"
    # The SMS may have gone out, so the charge stays.
    assert stored.quota_refunded_at is None
    assert await factory.sms_sent_this_month(user) == 1
    assert (await factory.reload(recent)).status == MessageStatus.SENDING
    assert await _tasks(ctx, device.id) == []
    assert [row.status for row in await factory.attempts(stuck)] == [
        AttemptStatus.NO_REPORT
    ]
    events = await _failure_events(session_factory, stuck)
    assert [event["error"] for event in events] == ["no_report"]


async def test_expired_messages_end_and_refund(ctx, factory, session_factory):
    user = await factory.user()
    await factory.quota(user, sms_sent_this_month=3)
    await _subscribe_to_failures(session_factory, user)
    device = await factory.device(user)
    past = datetime.now(UTC) - timedelta(seconds=1)
    pending = await factory.message(user, expires_at=past)
    assigned = await factory.message(
        user, status=MessageStatus.ASSIGNED, device=device, expires_at=past
    )
    sending = await factory.message(
        user, status=MessageStatus.SENDING, device=device, expires_at=past
    )
    await ctx.redis.xadd(
        ctx.keys.device_tasks_stream(device.id),
        {"message_id": str(assigned.id), "task": b"{}", "attempt": "1"},
    )

    expired = await expire_messages(ctx)

    assert expired == 2
    for message in (pending, assigned):
        stored = await factory.reload(message)
        assert stored.status == MessageStatus.EXPIRED
        assert stored.error == "expired"
        assert stored.quota_refunded_at is not None
        events = await _failure_events(session_factory, message)
        assert [(event["event"], event["status"]) for event in events] == [
            ("sms_failed", "expired")
        ]
    assert (await factory.reload(sending)).status == MessageStatus.SENDING
    assert await factory.sms_sent_this_month(user) == 1
    assert await _tasks(ctx, device.id) == []


async def test_expired_message_never_assigned(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    expired = await factory.message(
        user, age_s=60, expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    later = datetime.now(UTC) + timedelta(hours=1)
    valid = await factory.message(user, age_s=60, expires_at=later)

    assigned = await assign_pending_messages(ctx)

    assert assigned == 1
    assert (await factory.reload(expired)).status == MessageStatus.PENDING
    tasks = await _tasks(ctx, device.id)
    assert [task["message_id"] for task in tasks] == [str(valid.id)]
    assert tasks[0]["expires_at"].startswith(str(later.year))
    assert tasks[0]["attempt"] == 1


async def _delete_device(ctx, device):
    """Delete a device row the way the API does, which sets device_id NULL on its
    messages."""
    async with session_scope(ctx.session_factory) as session:
        await session.execute(delete(SMSDevice).where(SMSDevice.id == device.id))


async def test_named_device_deleted_fails_and_refunds(ctx, factory, session_factory):
    user = await factory.user()
    await factory.quota(user, sms_sent_this_month=2)
    await _subscribe_to_failures(session_factory, user)
    named = await factory.device(
        user, status=DeviceStatus.OFFLINE, phone_number="+34600000003"
    )
    await factory.device(user)
    message = await factory.message(user, requested_device=named)
    await assign_messages(ctx, [message.id])
    assigned = await factory.reload(message)
    assert assigned.status == MessageStatus.ASSIGNED
    assert assigned.from_number == "+34600000003"
    await _delete_device(ctx, named)

    ended = await end_tasks_of_deleted_devices(ctx)

    stored = await factory.reload(message)
    assert ended == 1
    assert stored.status == MessageStatus.FAILED
    assert stored.error == REQUESTED_DEVICE_DELETED
    assert stored.device_id is None
    # No phone started sending it, so it has no sender.
    assert stored.from_number is None
    assert stored.quota_refunded_at is not None
    assert await factory.sms_sent_this_month(user) == 1
    attempts = await factory.attempts(message)
    assert [(row.status, row.error) for row in attempts] == [
        (AttemptStatus.FAILED, REQUESTED_DEVICE_DELETED)
    ]
    events = await _failure_events(session_factory, message)
    assert [(event["event"], event["error"]) for event in events] == [
        ("sms_failed", REQUESTED_DEVICE_DELETED)
    ]
    assert [event["from"] for event in events] == [None]
    assert await end_tasks_of_deleted_devices(ctx) == 0
    assert await factory.sms_sent_this_month(user) == 1


async def test_deleted_device_task_moves(ctx, factory):
    user = await factory.user()
    deleted = await factory.device(user)
    message = await factory.message(user, status=MessageStatus.ASSIGNED, device=deleted)
    await _delete_device(ctx, deleted)
    online = await factory.device(user)

    ended = await end_tasks_of_deleted_devices(ctx)

    stored = await factory.reload(message)
    assert ended == 1
    assert stored.status == MessageStatus.ASSIGNED
    assert stored.device_id == online.id
    assert stored.attempts == 2
    assert [task["attempt"] for task in await _tasks(ctx, online.id)] == [2]
    attempts = await factory.attempts(message)
    assert [(row.status, row.error) for row in attempts] == [
        (AttemptStatus.MOVED, "device_deleted"),
        (AttemptStatus.ASSIGNED, None),
    ]


async def test_deleted_device_task_waits_pending(ctx, factory):
    user = await factory.user()
    await factory.quota(user, sms_sent_this_month=1)
    deleted = await factory.device(user)
    message = await factory.message(user, status=MessageStatus.ASSIGNED, device=deleted)
    await _delete_device(ctx, deleted)

    ended = await end_tasks_of_deleted_devices(ctx)

    stored = await factory.reload(message)
    assert ended == 1
    assert stored.status == MessageStatus.PENDING
    assert stored.next_attempt_at is None
    assert await factory.sms_sent_this_month(user) == 1
    returning = await factory.device(user)
    await handle_device_event(ctx, returning.id, "online")
    stored = await factory.reload(message)
    assert stored.status == MessageStatus.ASSIGNED
    assert stored.device_id == returning.id


async def test_deleted_device_claimed_task_fails(ctx, factory, session_factory):
    user = await factory.user()
    await factory.quota(user, sms_sent_this_month=2)
    await _subscribe_to_failures(session_factory, user)
    deleted = await factory.device(user)
    await factory.device(user)
    unnamed = await factory.message(user, status=MessageStatus.SENDING, device=deleted)
    named = await factory.message(
        user, status=MessageStatus.SENDING, requested_device=deleted
    )
    await _delete_device(ctx, deleted)

    ended = await end_tasks_of_deleted_devices(ctx)

    assert ended == 2
    for message in (unnamed, named):
        stored = await factory.reload(message)
        assert stored.status == MessageStatus.FAILED
        assert stored.error == "no_report"
        # The phone had claimed the SMS, so it may have gone out: the charge stays.
        assert stored.quota_refunded_at is None
        assert [row.status for row in await factory.attempts(message)] == [
            AttemptStatus.NO_REPORT
        ]
        events = await _failure_events(session_factory, message)
        assert [event["error"] for event in events] == ["no_report"]
    assert await factory.sms_sent_this_month(user) == 2


async def test_deleted_device_check_skips_others(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    assigned = await factory.message(user, status=MessageStatus.ASSIGNED, device=device)
    pending = await factory.message(user)
    deleted = await factory.device(user)
    delivered = await factory.message(
        user, status=MessageStatus.DELIVERED, device=deleted
    )
    await _delete_device(ctx, deleted)

    ended = await end_tasks_of_deleted_devices(ctx)

    assert ended == 0
    assert (await factory.reload(assigned)).status == MessageStatus.ASSIGNED
    assert (await factory.reload(pending)).status == MessageStatus.PENDING
    assert (await factory.reload(delivered)).status == MessageStatus.DELIVERED


def test_jobs_include_reliability_checks(ctx):
    names = {job.name for job in default_jobs(ctx)}

    assert {
        "message.retry_due",
        "message.move_unacknowledged",
        "message.fail_unreported",
        "message.expire",
        "message.end_deleted_device_tasks",
        "message.recover_stale",
    } <= names
