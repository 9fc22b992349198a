"""Liveness and readiness probes."""

from fastapi import APIRouter, Response

from mensajero_api.deps import ResourcesDep
from mensajero_api.jsonbody import JSONBodyRoute
from mensajero_common.ops import (
    metrics_response,
    postgres_check,
    readiness_response,
    redis_check,
)

router = APIRouter(tags=["health"], route_class=JSONBodyRoute)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Return 200 while the process serves requests, without checking any dependency."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(resources: ResourcesDep) -> Response:
    """Return 200 when Postgres and Redis both respond in time, else 503.

    The body names each dependency's result, as in the other services:
    `{"status": "ok", "checks": {"postgres": "ok", "redis": "ok"}}`.
    """
    return await readiness_response(
        {
            "postgres": postgres_check(resources.engine),
            "redis": redis_check(resources.redis),
        }
    )


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """Prometheus metrics of this process."""
    return metrics_response()
