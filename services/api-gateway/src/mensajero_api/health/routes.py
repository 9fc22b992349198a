"""Liveness and readiness probes."""

import structlog
from fastapi import APIRouter, Response, status
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from mensajero_api.deps import ResourcesDep
from mensajero_common.ops import metrics_response

logger = structlog.get_logger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Return 200 while the process serves requests, without checking any dependency."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(resources: ResourcesDep, response: Response) -> dict[str, str]:
    """Return 200 when Postgres and Redis both respond, else 503 marking the one that failed."""
    checks = {"postgres": "ok", "redis": "ok"}
    try:
        async with resources.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as error:
        logger.warning("readiness check of Postgres failed", error=str(error))
        checks["postgres"] = "unavailable"
    try:
        await resources.redis.ping()
    except (RedisError, OSError) as error:
        logger.warning("readiness check of Redis failed", error=str(error))
        checks["redis"] = "unavailable"

    ready = all(value == "ok" for value in checks.values())
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return {"status": "ok" if ready else "unavailable", **checks}


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """Prometheus metrics of this process."""
    return metrics_response()
