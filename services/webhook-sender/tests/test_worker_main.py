import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from arq import Worker, cron
from sqlalchemy import select
from test_delivery import (
    SessionFactory,
    create_user_with_webhook,
    delivery_state,
    record_incoming,
    wait_until,
)

from mensajero_common.keys import RedisKeys
from mensajero_common.models import WebhookDelivery, WebhookDeliveryStatus
from mensajero_common.redis import create_redis
from mensajero_common.settings import Settings
from mensajero_common.testing import (
    WebhookReceiver,
    answer_lifespan,
    scaled,
    serve_app,
)
from mensajero_common.webhook_outbox import queue_deliveries
from mensajero_webhooks.delivery.tasks import SWEEP_JOB, sweep
from mensajero_webhooks.main import (
    JOB_TIMEOUT_MARGIN_S,
    JobLinesAtDebug,
    create_worker,
)


def _environment(settings: Settings, **overrides: str) -> dict[str, str]:
    variables = {
        name: str(getattr(settings, name))
        for name in (
            "ENVIRONMENT",
            "DATABASE_URL",
            "REDIS_URL",
            "REDIS_KEY_PREFIX",
            "SECRET_KEY",
            "FIRST_SUPERUSER",
            "FIRST_SUPERUSER_PASSWORD",
        )
    }
    return {
        **os.environ,
        **variables,
        "LOG_JSON": "true",
        "LOG_LEVEL": "INFO",
        **overrides,
    }


async def _start_sender(
    settings: Settings, **overrides: str
) -> tuple[asyncio.subprocess.Process, bytes]:
    """Start a `mensajero-webhooks` process; return it and its log up to its start line."""
    process = await asyncio.create_subprocess_exec(
        shutil.which("mensajero-webhooks") or "mensajero-webhooks",
        env=_environment(settings, **overrides),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    output = b""
    async with asyncio.timeout(scaled(15)):
        while b'"webhook-sender started"' not in output:
            line = await process.stderr.readline()
            assert line, output.decode()
            output += line
    return process, output


async def _stop(process: asyncio.subprocess.Process) -> bytes:
    """Stop a sender with SIGTERM; return the rest of its log."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, rest = await asyncio.wait_for(process.communicate(), scaled(20))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return rest


async def test_dead_workers_job_ids_free_soon(settings: Settings) -> None:
    worker = create_worker(settings, handle_signals=False)
    try:
        # After a crash, arq keeps the ids of the dead worker's jobs taken this long,
        # the sweep's fixed id included: the next sweep cannot run before.
        longest_job_s = 2 * settings.WEBHOOK_TIMEOUT_S + JOB_TIMEOUT_MARGIN_S
        assert worker.in_progress_timeout_s <= longest_job_s + 10
    finally:
        await worker.close()


async def test_worker_polls_queue_often(settings: Settings) -> None:
    worker = create_worker(settings, handle_signals=False)
    try:
        # A job queued to an idle worker waits for the next read of the queue.
        assert worker.poll_delay_s <= 0.1
        # arq starts at most queue_read_limit jobs per read. This cap only binds when
        # endpoints respond in under 10 ms on every connection.
        jobs_per_second = worker.queue_read_limit / worker.poll_delay_s
        assert jobs_per_second >= 100 * settings.WEBHOOK_CONCURRENCY
    finally:
        await worker.close()


def _first_job_finished(worker: Worker) -> bool:
    running = any(not job_task.done() for job_task in worker.tasks.values())
    return worker.jobs_complete > 0 and not running


async def test_worker_runs_sweep_cron(settings, redis):
    every_second = cron(
        sweep,
        name=SWEEP_JOB,
        second=None,
        job_id=f"{settings.REDIS_KEY_PREFIX}:{SWEEP_JOB}",
    )
    worker = create_worker(
        settings, cron_jobs=[every_second], poll_delay=0.05, handle_signals=False
    )
    task = asyncio.create_task(worker.async_run())
    try:
        # arq counts a job complete before it records the result in Redis, and close()
        # cancels a job task still doing that, so the test waits for the task too.
        async with asyncio.timeout(scaled(5)):
            while not _first_job_finished(worker):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert "delivery" in worker.ctx
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()

    assert worker.jobs_failed == 0
    assert "engine" not in worker.ctx
    assert "http" not in worker.ctx


async def test_sweep_runs_every_interval(settings, redis):
    every_second = settings.model_copy(update={"WEBHOOK_SWEEP_INTERVAL_S": 1.0})
    worker = create_worker(every_second, poll_delay=0.05, handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    try:
        # arq kept a cron job's in-progress key for 60 s after each run, so a sweep with
        # one fixed id ran once a minute at most.
        async with asyncio.timeout(scaled(10)):
            while worker.jobs_complete < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()

    assert worker.jobs_failed == 0


async def test_worker_process_stops_on_sigterm(settings, redis):
    executable = shutil.which("mensajero-webhooks")
    assert executable is not None
    process = await asyncio.create_subprocess_exec(
        executable,
        env=_environment(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    output = b""
    try:
        async with asyncio.timeout(scaled(15)):
            while b'"webhook-sender started"' not in output:
                line = await process.stderr.readline()
                assert line, output.decode()
                output += line
        process.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(process.communicate(), scaled(10))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    started = json.loads(output.splitlines()[-1])
    assert started["event_loop"] == "uvloop"
    assert process.returncode == 0
    assert b'"webhook-sender stopped"' in rest


async def test_sigterm_lets_running_delivery_finish(settings, session_factory, redis):
    receiver = WebhookReceiver(delay_s=1.0)
    async with serve_app(receiver) as url:
        user, _ = await create_user_with_webhook(session_factory, url, "secret")
        _, delivery_ids = await record_incoming(session_factory, user)
        process = await asyncio.create_subprocess_exec(
            shutil.which("mensajero-webhooks") or "mensajero-webhooks",
            env=_environment(settings),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            arq_redis = create_redis(settings)
            await queue_deliveries(
                arq_redis, RedisKeys(settings.REDIS_KEY_PREFIX), delivery_ids
            )
            await arq_redis.aclose()
            await receiver.wait_for(1, timeout_s=15)
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), scaled(15))
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    delivery, attempts = await delivery_state(session_factory, delivery_ids[0])
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert delivery.status == WebhookDeliveryStatus.SUCCEEDED
    assert [attempt.status_code for attempt in attempts] == [200]
    # arq's start and end lines of each job are DEBUG, below LOG_LEVEL=INFO.
    assert "webhook_delivery.send(" not in stderr.decode()
    assert " ● " not in stderr.decode()


def _arq_record(message: str) -> logging.LogRecord:
    return logging.LogRecord(
        "arq.worker", logging.INFO, __file__, 1, message, (0.5, "job:send", ""), None
    )


def test_job_lines_logged_at_debug():
    job_filter = JobLinesAtDebug()
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.INFO)
        assert not job_filter.filter(_arq_record("%6.2fs → %s(%s)%s"))
        assert not job_filter.filter(_arq_record("%6.2fs ← %s ● %s"))
        assert job_filter.filter(_arq_record("%6.2fs ↻ %s retrying job in %0.2fs"))

        root.setLevel(logging.DEBUG)
        record = _arq_record("%6.2fs ← %s ● %s")
        assert job_filter.filter(record)
        assert record.levelno == logging.DEBUG
    finally:
        root.setLevel(level)


class FirstRequestHeld:
    """An endpoint that replies 200 to the first request once `release` is set and to
    the others at once. It records the `webhook-id` of every request."""

    def __init__(self) -> None:
        self.event_ids: list[str] = []
        self.release = asyncio.Event()
        self.received = asyncio.Condition()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        headers = dict(scope["headers"])
        self.event_ids.append(headers[b"webhook-id"].decode())
        async with self.received:
            self.received.notify_all()
        if len(self.event_ids) == 1:
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def wait_for(self, count: int, timeout_s: float) -> None:
        async with asyncio.timeout(scaled(timeout_s)), self.received:
            await self.received.wait_for(lambda: len(self.event_ids) >= count)


async def _parked_count_is(
    session_factory: SessionFactory, delivery_ids: list[uuid.UUID], expected: int
) -> bool:
    """Tell whether `expected` deliveries are not attempted and set aside for longer
    than the test lasts."""
    later = datetime.now(UTC) + timedelta(seconds=30)
    async with session_factory() as session:
        rows = await session.execute(
            select(WebhookDelivery.attempts, WebhookDelivery.next_attempt_at).where(
                WebhookDelivery.id.in_(delivery_ids)
            )
        )
        parked = [
            next_attempt_at
            for attempts, next_attempt_at in rows
            if attempts == 0 and next_attempt_at is not None and next_attempt_at > later
        ]
    return len(parked) == expected


async def test_sigterm_hands_parked_to_next_sender(
    settings: Settings, session_factory: SessionFactory, redis: Any
) -> None:
    receiver = FirstRequestHeld()
    # Each sender sweeps only at its start within the test, so the deliveries released
    # by the first one reach the second through the queue.
    hourly_sweep = {"WEBHOOK_SWEEP_INTERVAL_S": "3600"}
    async with serve_app(receiver) as url:
        user, _ = await create_user_with_webhook(session_factory, url, "secret")
        delivery_ids: list[uuid.UUID] = []
        for number in range(3):
            _, ids = await record_incoming(session_factory, user, body=f"sms {number}")
            delivery_ids += ids
        # The first request stays in flight for the whole test, within its 30 s timeout.
        first, _ = await _start_sender(
            settings,
            WEBHOOK_CONCURRENCY_PER_WEBHOOK="1",
            WEBHOOK_TIMEOUT_S="30",
            **hourly_sweep,
        )
        second = None
        try:
            arq_redis = create_redis(settings)
            await queue_deliveries(
                arq_redis, RedisKeys(settings.REDIS_KEY_PREFIX), delivery_ids
            )
            await arq_redis.aclose()
            # One attempt takes the webhook's only slot, and the two other deliveries
            # are parked for the attempt lease plus the breaker pause, 90 s here.
            await receiver.wait_for(1, timeout_s=10)
            await wait_until(
                lambda: _parked_count_is(session_factory, delivery_ids, 2), 10
            )
            second, _ = await _start_sender(settings, **hourly_sweep)

            first.send_signal(signal.SIGTERM)
            await receiver.wait_for(3, timeout_s=10)
            first_received = list(receiver.event_ids)
            receiver.release.set()
            first_log = await _stop(first)
            await wait_until(lambda: _all_succeeded(session_factory, delivery_ids), 10)
        finally:
            receiver.release.set()
            await _stop(first)
            if second is not None:
                await _stop(second)

    assert first.returncode == 0, first_log.decode()[-2000:]
    assert b'"deliveries released"' in first_log
    assert len(set(first_received)) == 3
    assert len(receiver.event_ids) == 3
    for delivery_id in delivery_ids:
        delivery, attempts = await delivery_state(session_factory, delivery_id)
        assert delivery.attempts == 1
        assert [attempt.status_code for attempt in attempts] == [200]


async def _all_succeeded(
    session_factory: SessionFactory, delivery_ids: list[uuid.UUID]
) -> bool:
    for delivery_id in delivery_ids:
        delivery, _ = await delivery_state(session_factory, delivery_id)
        if delivery.status != WebhookDeliveryStatus.SUCCEEDED:
            return False
    return True


async def test_failing_webhook_probed_every_pause(
    settings: Settings, session_factory: SessionFactory, redis: Any
) -> None:
    # The sender's process runs on uvloop, whose timers can fire a few milliseconds
    # before the breaker's probe time by time.monotonic(). Its first sweep runs while
    # the first attempts claim their deliveries.
    open_s = 1.0
    slots = 10
    probes = 4
    receiver = WebhookReceiver([500])
    read_at: datetime | None = None
    shown: list[datetime] = []
    async with serve_app(receiver) as url:
        user, _ = await create_user_with_webhook(
            session_factory, f"{url}/hook", "secret"
        )
        delivery_ids: list[uuid.UUID] = []
        for number in range(slots):
            _, ids = await record_incoming(session_factory, user, body=f"sms {number}")
            delivery_ids += ids
        # Every delivery takes a slot at once, the fifth failure pauses the webhook,
        # and the sweep does not run again within the test.
        sender, _ = await _start_sender(
            settings,
            WEBHOOK_CONCURRENCY_PER_WEBHOOK=str(slots),
            WEBHOOK_BREAKER_FAILURES="5",
            WEBHOOK_BREAKER_OPEN_S=str(open_s),
            WEBHOOK_RETRY_BASE_DELAY_S="0.5",
            WEBHOOK_TIMEOUT_S="0.3",
            WEBHOOK_MAX_ATTEMPTS="20",
            WEBHOOK_SWEEP_INTERVAL_S="3600",
        )
        try:
            arq_redis = create_redis(settings)
            await queue_deliveries(
                arq_redis, RedisKeys(settings.REDIS_KEY_PREFIX), delivery_ids
            )
            await arq_redis.aclose()
            with contextlib.suppress(TimeoutError):
                await receiver.wait_for(slots + 2, timeout_s=10)
                # Read during the pause after the second probe.
                await asyncio.sleep(open_s / 2)
                read_at = datetime.now(UTC)
                shown = await _pending_next_attempts(session_factory, delivery_ids)
                await receiver.wait_for(slots + probes, timeout_s=3 * open_s)
        finally:
            await _stop(sender)

    probe_times = [arrived for _, _, arrived in receiver.requests][slots:]
    assert len(probe_times) >= probes
    assert read_at is not None
    for earlier, later in itertools.pairwise(probe_times[:probes]):
        assert later - earlier >= open_s - 0.05
        assert later - earlier < open_s + scaled(0.5)
    # The deliveries show the third probe's time as their next attempt.
    started_after_read = []
    for delivery_id in delivery_ids:
        _, attempts = await delivery_state(session_factory, delivery_id)
        started_after_read += [
            attempt.started_at for attempt in attempts if attempt.started_at > read_at
        ]
    next_started = min(started_after_read)
    assert shown
    # No pending delivery shows a time that has passed without an attempt.
    assert min(shown) > read_at - timedelta(seconds=scaled(0.5))
    assert abs((min(shown) - next_started).total_seconds()) < scaled(0.5)


async def _pending_next_attempts(
    session_factory: SessionFactory, delivery_ids: list[uuid.UUID]
) -> list[datetime]:
    async with session_factory() as session:
        rows = await session.scalars(
            select(WebhookDelivery.next_attempt_at).where(
                WebhookDelivery.id.in_(delivery_ids),
                WebhookDelivery.status == WebhookDeliveryStatus.PENDING,
            )
        )
        return [next_attempt_at for next_attempt_at in rows if next_attempt_at]
