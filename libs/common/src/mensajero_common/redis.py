"""Redis client factory."""

from redis.asyncio import Redis

from mensajero_common.settings import Settings


def create_redis(settings: Settings) -> "Redis[bytes]":
    return Redis.from_url(
        settings.REDIS_URL, decode_responses=False, health_check_interval=30
    )
