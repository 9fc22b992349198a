"""The webhook-sender's arq worker class: arq's Worker with a cheaper start of each job,
a hook that runs as soon as SIGTERM or SIGINT arrives, and a poll loop that outlives a
Redis outage.

arq 0.28 starts a job with a WATCH transaction on a connection of its own: WATCH, EXISTS
and ZSCORE, then MULTI, PSETEX and EXEC, four round trips to Redis. In the full webhook
benchmark (docs/benchmarks.md) that was about a quarter of the sender's CPU, by py-spy.
DeliveryWorker makes the same checks and sets the same in-progress key with one Lua
script, which Redis runs atomically, so two workers still never start the same job.

arq 0.28's poll loop lets a Redis connection error out of Worker.main, which stops the
worker, so a Redis restart stopped the sender (and `make run` with it). DeliveryWorker
logs the error and polls again, and the sweep queues again from Postgres whatever
deliveries the restart lost.

NOTE: start_jobs and _poll_iteration use arq's private Worker state and methods (sem,
job_counter, tasks, run_job, _poll_iteration), so the dependency on arq stops below
0.29. Compare this class with a newer arq's Worker.start_jobs and Worker.main before
raising that bound.
"""

import asyncio
import time
from collections.abc import Callable
from signal import Signals
from typing import Any

import structlog
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = structlog.get_logger(__name__)

# Wait between two polls while Redis is unavailable, in place of the poll delay.
REDIS_RETRY_DELAY_S = 1.0
# While Redis stays down, the failed polls are logged once per this many seconds.
REDIS_DOWN_LOG_INTERVAL_S = 30.0

# KEYS: the job's in-progress key, the queue. ARGV: the job id, the current time in ms,
# the in-progress key's lifetime in ms. Returns the job's score (the time in ms at which
# it is due), or nil when another worker runs it, it has left the queue or it is not due.
START_JOB_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    return false
end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then
    return false
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[3])
return score
"""


class DeliveryWorker(Worker):
    """arq's Worker. `on_stop_signal(ctx)` runs when a signal stops the worker, before
    arq's wait for the running jobs (job_completion_wait), whereas arq's on_shutdown
    runs after it."""

    def __init__(
        self,
        *args: Any,
        on_stop_signal: Callable[[dict[str, Any]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._start_job_script: AsyncScript | None = None
        self._on_stop_signal = on_stop_signal
        # time.monotonic() of the first failed poll of the current Redis outage, of its
        # latest log line, and the polls failed since that line.
        self._redis_down_since: float | None = None
        self._redis_down_logged_at = 0.0
        self._redis_failed_polls = 0

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        super().handle_sig_wait_for_completion(signum)
        if self._on_stop_signal is not None:
            self._on_stop_signal(self.ctx)

    async def _poll_iteration(self) -> None:
        """Run one poll of arq's loop. On a Redis connection error, log it and wait, so
        that the loop polls again instead of stopping the worker."""
        try:
            await super()._poll_iteration()
        except (RedisConnectionError, RedisTimeoutError) as error:
            self._record_failed_poll(error)
            await asyncio.sleep(REDIS_RETRY_DELAY_S)
            return
        if self._redis_down_since is not None:
            log.info(
                "Redis is reachable again, polling the job queue",
                down_s=round(time.monotonic() - self._redis_down_since, 1),
            )
            self._redis_down_since = None

    def _record_failed_poll(self, error: Exception) -> None:
        now = time.monotonic()
        self._redis_failed_polls += 1
        if self._redis_down_since is None:
            self._redis_down_since = now
        elif now - self._redis_down_logged_at < REDIS_DOWN_LOG_INTERVAL_S:
            return
        log.warning(
            "polling the job queue failed: Redis is unavailable, retrying",
            error=repr(error),
            failed_polls=self._redis_failed_polls,
            down_s=round(now - self._redis_down_since, 1),
            retry_in_s=REDIS_RETRY_DELAY_S,
        )
        self._redis_down_logged_at = now
        self._redis_failed_polls = 0

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start each of `job_ids` that is due and not running elsewhere, as slots free up."""
        if self._start_job_script is None:
            self._start_job_script = self.pool.register_script(START_JOB_SCRIPT)
        in_progress_ms = int(self.in_progress_timeout_s * 1000)

        for job_id_bytes in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1

            job_id = job_id_bytes.decode()
            try:
                score = await self._start_job_script(
                    keys=[in_progress_key_prefix + job_id, self.queue_name],
                    args=[job_id, timestamp_ms(), in_progress_ms],
                )
            except BaseException:
                self.job_counter -= 1
                self.sem.release()
                raise
            if score is None:
                self.job_counter -= 1
                self.sem.release()
                continue

            task = self.loop.create_task(
                self.run_job(job_id, int(float(score.decode())))
            )
            task.add_done_callback(
                lambda _: self._release_sem_dec_counter_on_complete()
            )
            self.tasks[job_id] = task
