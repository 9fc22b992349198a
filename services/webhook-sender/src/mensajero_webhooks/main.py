"""Entry point of `mensajero-webhooks`: the webhook-sender's arq worker.

The worker reads jobs from `keys.arq_queue`. Its context (`ctx`) contains the settings,
the keys, the engine and a session factory, which `on_startup` opens and `on_shutdown`
closes. `ctx["redis"]` is arq's own client (an ArqRedis), which arq opens from REDIS_URL.
"""

import asyncio
from typing import Any

import structlog
from arq import cron
from arq.connections import RedisSettings
from arq.worker import Worker

from mensajero_common.db import create_engine, create_session_factory
from mensajero_common.keys import RedisKeys
from mensajero_common.logging import configure_logging
from mensajero_common.settings import Settings, get_settings

log = structlog.get_logger(__name__)

HEARTBEAT_JOB = "worker.heartbeat"


async def on_startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    engine = create_engine(settings)
    ctx["engine"] = engine
    ctx["session_factory"] = create_session_factory(engine)
    log.info("webhook-sender started", queue=ctx["keys"].arq_queue)


async def on_shutdown(ctx: dict[str, Any]) -> None:
    engine = ctx.pop("engine", None)
    if engine is not None:
        await engine.dispose()
    log.info("webhook-sender stopped")


async def heartbeat(ctx: dict[str, Any]) -> None:
    """Log that the worker runs its cron jobs, with the length of its queue."""
    queued = await ctx["redis"].zcard(ctx["keys"].arq_queue)
    log.debug("worker heartbeat", queued_jobs=queued)


def create_worker(settings: Settings, **overrides: Any) -> Worker:
    """Build the worker. `overrides` replace Worker arguments, so tests can shorten delays."""
    keys = RedisKeys(settings.REDIS_KEY_PREFIX)
    options: dict[str, Any] = {
        "queue_name": keys.arq_queue,
        "redis_settings": RedisSettings.from_dsn(settings.REDIS_URL),
        "cron_jobs": [
            # arq stores a job under "arq:job:<id>" whatever the queue, so the id carries
            # the key prefix to keep installs that share a Redis server apart.
            cron(
                heartbeat,
                name=HEARTBEAT_JOB,
                second=0,
                job_id=f"{keys.prefix}:{HEARTBEAT_JOB}",
            ),
        ],
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        "ctx": {"settings": settings, "keys": keys},
        "keep_result": 0,
    }
    options.update(overrides)
    return Worker(**options)


def main() -> None:
    settings = get_settings()
    configure_logging(settings, "webhook-sender")
    # arq's Worker takes the current event loop when it is built, so set one first.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        # Returns once SIGTERM or SIGINT has stopped the worker and on_shutdown has run.
        create_worker(settings).run()
    finally:
        loop.close()


if __name__ == "__main__":
    main()
