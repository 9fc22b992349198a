"""Redis client factory."""

from arq.connections import ArqRedis

from mensajero_common.settings import Settings


def create_redis(settings: Settings) -> ArqRedis:
    """Open a client for streams, channels and keys that can also enqueue arq jobs."""
    return ArqRedis.from_url(
        settings.REDIS_URL, decode_responses=False, health_check_interval=30
    )
