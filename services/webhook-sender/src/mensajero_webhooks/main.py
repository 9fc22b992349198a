"""Entry point of `mensajero-webhooks`: the webhook-sender's arq worker.

The worker reads `webhook_delivery.send` jobs from `keys.arq_queue`, and its cron job
`webhook_delivery.sweep` queues again any due delivery whose job Redis lost. `on_startup`
opens the engine and the HTTP connection pool and puts a DeliveryContext in
`ctx["delivery"]`; `on_shutdown` closes them. `ctx["redis"]` is arq's own client, opened from REDIS_URL.
On SIGTERM the worker hands the deliveries that it parked or claimed and did not attempt
back to the queue at once (see DeliveryContext.close).
/healthz, /readyz and /metrics are served on OPS_HOST:WEBHOOKS_OPS_PORT.
"""

import asyncio
import logging
import math
from typing import Any

import structlog
import uvloop
from arq import cron
from arq.connections import RedisSettings
from arq.cron import CronJob

from mensajero_common.db import create_engine, create_session_factory
from mensajero_common.keys import RedisKeys
from mensajero_common.logging import configure_logging
from mensajero_common.ops import create_ops_app, postgres_check, redis_check, serve_ops
from mensajero_common.settings import Settings, get_settings
from mensajero_common.startup import configure_garbage_collector
from mensajero_webhooks.delivery.http_client import create_http_session
from mensajero_webhooks.delivery.service import DeliveryContext
from mensajero_webhooks.delivery.tasks import SWEEP_JOB, job_functions, sweep
from mensajero_webhooks.worker import DeliveryWorker

log = structlog.get_logger(__name__)

# Time a delivery job may run beyond the HTTP timeouts of its two attempts (its own and
# the last parked one it takes), for its database writes.
JOB_TIMEOUT_MARGIN_S = 30
# Maximum run time of one sweep, which only queues jobs. After a crash, arq keeps each
# job id of the dead worker in use for the worker's maximum job timeout plus 10 s (300 s
# for a job without a timeout). The sweep's job id is fixed, so a sweep that died with
# its worker blocks the next sweep for that long.
SWEEP_TIMEOUT_S = 30
# Time after SIGTERM for the attempts in flight to finish, beyond the HTTP timeout, before
# arq cancels them. An attempt cancelled during its POST keeps its lease, and the sweep
# queues it again once the lease has run out. One cancelled before its POST is released.
SHUTDOWN_GRACE_MARGIN_S = 5
# Time between two reads of the job queue, which is also the longest wait of a job queued
# to an idle worker. An idle worker sends one ZRANGEBYSCORE per read: 0.4 % of a core at
# 0.1 s and 1.3 % at 0.05 s, on the machine of docs/benchmarks.md.
POLL_DELAY_S = 0.1
# arq's queue_read_limit (the maximum of jobs started per read) per job slot. arq 0.28's
# default, 5 per slot every 0.5 s, capped the sender at 500 deliveries per second with
# WEBHOOK_CONCURRENCY 50. 10 per slot every 0.1 s allows 5,000.
QUEUE_READ_LIMIT_PER_SLOT = 10


async def on_startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    engine = create_engine(settings, application_name="mensajero-webhook-sender")
    http = create_http_session(settings)
    ctx["engine"] = engine
    ctx["http"] = http
    ctx["session_factory"] = create_session_factory(engine)
    ctx["delivery"] = DeliveryContext(
        settings=settings,
        keys=ctx["keys"],
        engine=engine,
        session_factory=ctx["session_factory"],
        redis=ctx["redis"],
        http=http,
    )
    ops_app = create_ops_app(
        lambda: {"postgres": postgres_check(engine), "redis": redis_check(ctx["redis"])}
    )
    ctx["ops_server"] = asyncio.create_task(
        serve_ops(ops_app, settings.OPS_HOST, settings.WEBHOOKS_OPS_PORT)
    )
    log.info(
        "webhook-sender started",
        queue=ctx["keys"].arq_queue,
        ops_port=settings.WEBHOOKS_OPS_PORT,
        event_loop=type(asyncio.get_running_loop()).__module__,
    )


def on_stop_signal(ctx: dict[str, Any]) -> None:
    delivery: DeliveryContext | None = ctx.get("delivery")
    if delivery is not None:
        delivery.begin_close()


async def on_shutdown(ctx: dict[str, Any]) -> None:
    ops_server = ctx.pop("ops_server", None)
    if ops_server is not None:
        ops_server.cancel()
        await asyncio.gather(ops_server, return_exceptions=True)
    delivery: DeliveryContext | None = ctx.pop("delivery", None)
    if delivery is not None:
        await delivery.close(drain_wait_s(ctx["settings"]))
    http = ctx.pop("http", None)
    if http is not None:
        await http.close()
    engine = ctx.pop("engine", None)
    if engine is not None:
        await engine.dispose()
    log.info("webhook-sender stopped")


def drain_wait_s(settings: Settings) -> float:
    """Return how long shutdown waits for the attempts that drain tasks have in flight."""
    return settings.WEBHOOK_TIMEOUT_S + SHUTDOWN_GRACE_MARGIN_S


def sweep_schedule(settings: Settings, keys: RedisKeys) -> CronJob:
    """Run the sweep every WEBHOOK_SWEEP_INTERVAL_S, rounded to whole seconds or minutes."""
    interval_s = max(1, round(settings.WEBHOOK_SWEEP_INTERVAL_S))
    if interval_s < 60:
        seconds: set[int] | None = set(range(0, 60, interval_s))
        minutes: set[int] | None = None
    else:
        seconds = {0}
        minutes = set(range(0, 60, max(1, interval_s // 60)))
    # arq gives each run the id "<name>:<time of the run>", so replicas queue each run
    # once. A fixed id made every run wait for the last one's in-progress key, which arq
    # keeps 60 s after a cron job ends. arq stores a job under "arq:job:<id>" whatever
    # the queue, so the name carries the key prefix to keep installs that share a Redis
    # server apart.
    return cron(
        sweep,
        name=sweep_job_name(keys),
        second=seconds,
        minute=minutes,
        run_at_startup=True,
        timeout=SWEEP_TIMEOUT_S,
    )


def sweep_job_name(keys: RedisKeys) -> str:
    return f"{keys.prefix}:{SWEEP_JOB}"


def create_worker(settings: Settings, **overrides: Any) -> DeliveryWorker:
    """Build the worker. `overrides` replace Worker arguments, so tests can shorten delays."""
    keys = RedisKeys(settings.REDIS_KEY_PREFIX)
    options: dict[str, Any] = {
        "functions": job_functions(
            2 * settings.WEBHOOK_TIMEOUT_S + JOB_TIMEOUT_MARGIN_S, SWEEP_TIMEOUT_S
        ),
        "queue_name": keys.arq_queue,
        "redis_settings": RedisSettings.from_dsn(settings.REDIS_URL),
        "cron_jobs": [sweep_schedule(settings, keys)],
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        "on_stop_signal": on_stop_signal,
        "ctx": {"settings": settings, "keys": keys},
        "max_jobs": settings.WEBHOOK_CONCURRENCY,
        "poll_delay": POLL_DELAY_S,
        "queue_read_limit": QUEUE_READ_LIMIT_PER_SLOT * settings.WEBHOOK_CONCURRENCY,
        # On SIGTERM, arq stops taking jobs and waits this long for the running ones.
        "job_completion_wait": math.ceil(settings.WEBHOOK_TIMEOUT_S)
        + SHUTDOWN_GRACE_MARGIN_S,
        # No results are kept, so that a job id is free again once its job has run and
        # the sweep can queue a delivery whose attempt died with its worker.
        "keep_result": 0,
    }
    options.update(overrides)
    return DeliveryWorker(**options)


class JobLinesAtDebug(logging.Filter):
    """Log arq's start and end line of each job at DEBUG instead of INFO.

    Two INFO lines per delivery cost the sender about 8 % of its CPU at a few hundred
    deliveries per second (py-spy, `make bench`), and the deliveries log their own
    failures. arq's lines for retried, cancelled and failed jobs stay as they are.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not isinstance(record.msg, str):
            return True
        if not record.msg.startswith(("%6.2fs → ", "%6.2fs ← ")):
            return True
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        record.levelno = logging.DEBUG
        record.levelname = "DEBUG"
        return True


def main() -> None:
    settings = get_settings()
    configure_logging(settings, "webhook-sender")
    logging.getLogger("arq.worker").addFilter(JobLinesAtDebug())
    # arq's Worker takes the current event loop when it is built, so set one first.
    # uvloop cut the sender's CPU per delivery by about 5 % in the full webhook benchmark.
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        worker = create_worker(settings)
        configure_garbage_collector()
        # Returns once SIGTERM or SIGINT has stopped the worker and on_shutdown has run.
        worker.run()
    finally:
        loop.close()


if __name__ == "__main__":
    main()
