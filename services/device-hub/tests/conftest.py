from collections.abc import AsyncIterator

import pytest
from hub_helpers import serve_hub
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.settings import Settings


@pytest.fixture
async def hub_url(
    settings: Settings,
    session_factory: async_sessionmaker[AsyncSession],
    redis: Redis,
) -> AsyncIterator[str]:
    async with serve_hub(settings) as url:
        yield url
