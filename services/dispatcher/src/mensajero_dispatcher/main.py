"""Entry point of `mensajero-dispatcher`: the stream consumer and the periodic jobs."""

import asyncio
import signal

import structlog

from mensajero_common.logging import configure_logging
from mensajero_common.settings import Settings, get_settings
from mensajero_dispatcher.consumer import StreamConsumer
from mensajero_dispatcher.context import open_context
from mensajero_dispatcher.scheduler import default_jobs, run_periodic_jobs

log = structlog.get_logger(__name__)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the consumer and the periodic jobs until `stop` is set.

    If either fails with an error it does not retry, the other is cancelled and the
    error propagates.
    """
    async with open_context(settings) as ctx:
        consumer = StreamConsumer(ctx)
        jobs = default_jobs(ctx)
        log.info(
            "dispatcher started",
            consumer=consumer.name,
            jobs=[job.name for job in jobs],
        )
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(consumer.run(stop), name="stream-consumer")
                group.create_task(run_periodic_jobs(ctx, jobs, stop), name="jobs")
        finally:
            log.info("dispatcher stopped", consumer=consumer.name)


async def _serve_until_signalled(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(settings, stop)


def main() -> None:
    settings = get_settings()
    configure_logging(settings, "dispatcher")
    asyncio.run(_serve_until_signalled(settings))


if __name__ == "__main__":
    main()
