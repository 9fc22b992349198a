import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import func

from mensajero_common.keys import RedisKeys
from mensajero_common.redis import create_redis
from mensajero_common.settings import Settings
from mensajero_common.testing import scaled
from mensajero_webhooks.worker import DeliveryWorker

JOB_TIMEOUT_S = 5


class JobLog:
    """Job ids of the finished `record` jobs, and an event that `wait` jobs wait for."""

    def __init__(self) -> None:
        self.finished: list[str] = []
        self.release = asyncio.Event()


async def record(ctx: dict[str, Any]) -> None:
    await asyncio.sleep(0.01)
    ctx["job_log"].finished.append(ctx["job_id"])


async def wait(ctx: dict[str, Any]) -> None:
    await ctx["job_log"].release.wait()


@pytest.fixture
async def arq_redis(settings: Settings, redis: Any) -> AsyncIterator[ArqRedis]:
    """An arq client; the `redis` fixture deletes the test's keys afterwards."""
    client = create_redis(settings)
    yield client
    await client.aclose()


def build_worker(
    settings: Settings, arq_redis: ArqRedis, job_log: JobLog
) -> DeliveryWorker:
    return DeliveryWorker(
        [
            # More than one try, so that arq's retry count does not hide a second start.
            func(record, name="test.record", max_tries=5, timeout=JOB_TIMEOUT_S),
            func(wait, name="test.wait", max_tries=1, timeout=JOB_TIMEOUT_S),
        ],
        redis_pool=arq_redis,
        queue_name=RedisKeys(settings.REDIS_KEY_PREFIX).arq_queue,
        ctx={"job_log": job_log},
        poll_delay=0.02,
        handle_signals=False,
        keep_result=0,
        max_jobs=5,
    )


async def enqueue(
    settings: Settings, arq_redis: ArqRedis, function: str, name: str, **options: Any
) -> str:
    job_id = f"{settings.REDIS_KEY_PREFIX}:{name}"
    job = await arq_redis.enqueue_job(
        function,
        _job_id=job_id,
        _queue_name=RedisKeys(settings.REDIS_KEY_PREFIX).arq_queue,
        **options,
    )
    assert job is not None
    return job_id


async def test_workers_run_each_job_once(
    settings: Settings, arq_redis: ArqRedis
) -> None:
    job_log = JobLog()
    workers = [build_worker(settings, arq_redis, job_log) for _ in range(3)]
    job_ids = [
        await enqueue(settings, arq_redis, "test.record", f"job-{number}")
        for number in range(60)
    ]
    runs = [asyncio.create_task(worker.async_run()) for worker in workers]
    try:
        async with asyncio.timeout(scaled(10)):
            while len(job_log.finished) < len(job_ids):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        # Jobs that a second worker started by mistake would finish within this time.
        await asyncio.sleep(0.2)
    finally:
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        for worker in workers:
            await worker.close()

    assert sorted(job_log.finished) == sorted(job_ids)
    assert sum(worker.jobs_complete for worker in workers) == len(job_ids)


async def test_start_jobs_marks_job_in_progress(
    settings: Settings, arq_redis: ArqRedis
) -> None:
    job_log = JobLog()
    worker = build_worker(settings, arq_redis, job_log)
    job_id = await enqueue(settings, arq_redis, "test.wait", "waiting")
    try:
        await worker.start_jobs([job_id.encode()])
        in_progress_ms = await arq_redis.pttl(in_progress_key_prefix + job_id)

        assert list(worker.tasks) == [job_id]
        assert worker.job_counter == 1
        assert 0 < in_progress_ms <= worker.in_progress_timeout_s * 1000

        job_log.release.set()
        await asyncio.wait_for(worker.tasks[job_id], scaled(5))
        assert worker.job_counter == 0
    finally:
        await worker.close()


@pytest.mark.parametrize("case", ["running elsewhere", "not due", "not queued"])
async def test_start_jobs_skips_job(
    settings: Settings, arq_redis: ArqRedis, case: str
) -> None:
    job_log = JobLog()
    worker = build_worker(settings, arq_redis, job_log)
    if case == "running elsewhere":
        job_id = await enqueue(settings, arq_redis, "test.record", "elsewhere")
        await arq_redis.set(in_progress_key_prefix + job_id, b"1", px=60_000)
    elif case == "not due":
        job_id = await enqueue(
            settings, arq_redis, "test.record", "deferred", _defer_by=60
        )
    else:
        job_id = f"{settings.REDIS_KEY_PREFIX}:never-queued"
    # asyncio's semaphores expose their count only as _value.
    free_slots = worker.sem._value
    try:
        await worker.start_jobs([job_id.encode()])

        assert worker.tasks == {}
        assert worker.job_counter == 0
        assert worker.sem._value == free_slots
    finally:
        await worker.close()
