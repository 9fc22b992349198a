"""Health, readiness and metrics endpoints shared by the services.

The HTTP services (API and device-hub) add `MetricsMiddleware` and serve these routes from
their own app. The workers (dispatcher and webhook-sender) have no HTTP app, so they serve
`create_ops_app` with uvicorn on their ops port inside their own event loop.
"""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mensajero_common.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS

logger = structlog.get_logger(__name__)

# A dependency that does not respond within this time counts as down for /readyz.
READINESS_TIMEOUT_S = 2.0

ReadinessCheck = Callable[[], Awaitable[None]]


def postgres_check(engine: AsyncEngine) -> ReadinessCheck:
    async def check() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    return check


def postgres_session_check(
    session_factory: async_sessionmaker[AsyncSession],
) -> ReadinessCheck:
    async def check() -> None:
        async with session_factory() as session:
            await session.execute(text("SELECT 1"))

    return check


def redis_check(redis: Redis) -> ReadinessCheck:
    async def check() -> None:
        await redis.ping()

    return check


async def run_checks(checks: dict[str, ReadinessCheck]) -> tuple[bool, dict[str, str]]:
    """Run every readiness check; return whether all passed and each one's result."""
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            await asyncio.wait_for(check(), READINESS_TIMEOUT_S)
        except Exception as error:  # any failure of a dependency means "not ready"
            logger.warning(
                "readiness check failed", check=name, error=type(error).__name__
            )
            results[name] = "unavailable"
        else:
            results[name] = "ok"
    return all(result == "ok" for result in results.values()), results


async def readiness_response(checks: dict[str, ReadinessCheck]) -> JSONResponse:
    """Run the checks and return the /readyz answer: 200 when all pass, else 503."""
    ready, results = await run_checks(checks)
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": results},
        status_code=200 if ready else 503,
    )


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


def metrics_response() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def metrics(_: Request) -> Response:
    return metrics_response()


def create_ops_app(
    checks: Callable[[], dict[str, ReadinessCheck]],
    before_metrics: Callable[[], Awaitable[None]] | None = None,
) -> Starlette:
    """Build the app that a worker serves: /healthz, /readyz and /metrics.

    `before_metrics` refreshes gauges that are read from elsewhere (such as stream lag)
    right before each scrape.
    """

    async def metrics_with_refresh(_: Request) -> Response:
        if before_metrics is not None:
            try:
                await asyncio.wait_for(before_metrics(), READINESS_TIMEOUT_S)
            except Exception as error:  # the scrape still returns the other metrics
                logger.warning("metrics refresh failed", error=type(error).__name__)
        return metrics_response()

    async def readyz(_: Request) -> Response:
        return await readiness_response(checks())

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_with_refresh),
        ]
    )


async def serve_ops(app: Starlette, host: str, port: int) -> None:
    """Serve the ops app until cancelled; port 0 disables it."""
    if port == 0:
        return
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="off")
    )
    # The worker owns the process signals: uvicorn's serve() would take SIGTERM and SIGINT
    # over with capture_signals() (uvicorn 0.55), so the server gets a no-op in its place.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
    try:
        await server.serve()
    except asyncio.CancelledError:
        server.should_exit = True
        raise
    except SystemExit:
        # uvicorn exits when it cannot bind; the worker keeps running without the endpoints.
        logger.error("ops endpoints failed to start", host=host, port=port)


class MetricsMiddleware:
    """Count HTTP requests by route template (not raw path, to bound the label values)."""

    def __init__(self, app: Any, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            HTTP_REQUESTS.labels(
                self.service, method, template, str(status_holder["status"])
            ).inc()
            HTTP_REQUEST_DURATION.labels(self.service, method, template).observe(
                time.perf_counter() - started
            )
