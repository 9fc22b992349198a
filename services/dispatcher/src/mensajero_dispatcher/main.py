"""Entry point of `mensajero-dispatcher`: the stream consumer and the periodic jobs.

/healthz, /readyz and /metrics are served on OPS_HOST:DISPATCHER_OPS_PORT.
"""

import asyncio
import signal

import structlog
import uvloop
from redis.exceptions import ResponseError

from mensajero_common.logging import configure_logging
from mensajero_common.metrics import STREAM_LAG
from mensajero_common.ops import (
    create_ops_app,
    postgres_session_check,
    redis_check,
    serve_ops,
)
from mensajero_common.settings import Settings, get_settings
from mensajero_common.startup import configure_garbage_collector
from mensajero_dispatcher.consumer import StreamConsumer
from mensajero_dispatcher.context import DispatcherContext, open_context
from mensajero_dispatcher.scheduler import default_jobs, run_periodic_jobs

log = structlog.get_logger(__name__)


async def refresh_stream_lag(ctx: DispatcherContext) -> None:
    """Set the lag gauge of each stream the dispatcher reads: unread plus unacknowledged."""
    for stream in (ctx.keys.new_messages_stream, ctx.keys.device_events_stream):
        try:
            groups = await ctx.redis.xinfo_groups(stream)
        except ResponseError:
            # The stream does not exist until its first entry or the consumer's start.
            STREAM_LAG.labels(stream).set(0)
            continue
        for group in groups:
            if group.get("name") in (
                ctx.keys.dispatcher_group,
                ctx.keys.dispatcher_group.encode(),
            ):
                lag = group.get("lag") or 0
                STREAM_LAG.labels(stream).set(int(lag) + int(group.get("pending") or 0))


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
        ops_app = create_ops_app(
            lambda: {
                "postgres": postgres_session_check(ctx.session_factory),
                "redis": redis_check(ctx.redis),
            },
            before_metrics=lambda: refresh_stream_lag(ctx),
        )
        ops_server = asyncio.create_task(
            serve_ops(ops_app, settings.OPS_HOST, settings.DISPATCHER_OPS_PORT),
            name="ops-server",
        )
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(consumer.run(stop), name="stream-consumer")
                group.create_task(run_periodic_jobs(ctx, jobs, stop), name="jobs")
        finally:
            ops_server.cancel()
            await asyncio.gather(ops_server, return_exceptions=True)
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
    configure_garbage_collector()
    # uvloop's event loop spends less CPU per socket event than asyncio's own.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve_until_signalled(settings))


if __name__ == "__main__":
    main()
