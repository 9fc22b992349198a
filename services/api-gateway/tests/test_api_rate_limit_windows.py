"""The moving windows behind the rate limits, on Redis, against the `limits` package."""

import asyncio
import time

import pytest
from api_test_helpers import MakeUser
from fastapi import FastAPI
from httpx import AsyncClient
from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from mensajero_api.ratelimits.windows import MovingWindows, Window
from mensajero_common.keys import RedisKeys
from mensajero_common.settings import Settings


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Two windows per rule, as in the defaults.
    return settings.model_copy(
        update={
            "RATE_LIMIT_PER_USER": "100/second;3000/minute",
            "RATE_LIMIT_PER_API_KEY": "100/second;3000/minute",
        }
    )


@pytest.fixture
def windows(redis: Redis, redis_keys: RedisKeys) -> MovingWindows:
    return MovingWindows(redis, redis_keys.rate_limit_prefix)


def _window(limit: str, identifier: str = "client") -> Window:
    return Window(parse(limit), "user", identifier)


async def test_request_fits_until_window_full(windows: MovingWindows) -> None:
    window = _window("2/minute")

    first_at = time.time()
    assert await windows.acquire([window]) is None
    assert await windows.acquire([window]) is None
    full = await windows.acquire([window])

    assert full is not None
    assert full.window == window
    # The first request leaves the window a minute after it was counted.
    assert first_at + 60 <= full.frees_at <= time.time() + 60


async def test_rejected_request_counted_by_no_window(
    windows: MovingWindows, redis: Redis
) -> None:
    per_second = _window("10/second")
    per_minute = _window("1/minute")

    assert await windows.acquire([per_second, per_minute]) is None
    full = await windows.acquire([per_second, per_minute])

    assert full is not None and full.window == per_minute
    # Only the accepted request is in the window that still had room.
    assert await redis.llen(windows.key(per_second)) == 1
    assert await redis.llen(windows.key(per_minute)) == 1


async def test_test_only_records_nothing(windows: MovingWindows, redis: Redis) -> None:
    window = _window("1/minute")

    assert await windows.acquire([window], record=False) is None
    assert await redis.exists(windows.key(window)) == 0
    assert await windows.acquire([window]) is None
    full = await windows.acquire([window], record=False)

    assert full is not None
    assert await redis.llen(windows.key(window)) == 1


async def test_window_frees_its_oldest_slot(windows: MovingWindows) -> None:
    window = _window("1 per 1 second")

    assert await windows.acquire([window]) is None
    full = await windows.acquire([window])
    assert full is not None
    await asyncio.sleep(max(full.frees_at - time.time(), 0) + 0.05)

    assert await windows.acquire([window]) is None


async def test_limits_package_reads_the_same_counters(
    windows: MovingWindows, settings: Settings, redis: Redis, redis_keys: RedisKeys
) -> None:
    """The lists keep the layout and keys of `limits`' moving window, so counters taken
    before an upgrade still count, and `limits` can read them."""
    window = _window("5/minute", "reader")
    storage = RedisStorage(
        "async+" + settings.REDIS_URL,
        implementation="redispy",
        key_prefix=redis_keys.rate_limit_prefix,
        # The fixture's pool, which the fixture closes. limits 5.8 documents
        # `connection_pool` but types its keyword options as scalars.
        connection_pool=redis.connection_pool,  # type: ignore[arg-type]
    )
    reference = MovingWindowRateLimiter(storage)

    for _ in range(3):
        assert await windows.acquire([window]) is None
    assert await reference.hit(window.item, window.namespace, window.identifier)
    stats = await reference.get_window_stats(
        window.item, window.namespace, window.identifier
    )

    assert stats.remaining == 1
    assert await windows.acquire([window]) is None
    assert await windows.acquire([window]) is not None


async def test_api_key_request_takes_two_calls(
    app: FastAPI, client: AsyncClient, make_user: MakeUser, monkeypatch
) -> None:
    """Two windows per rule still cost one call for the key and one for its owner."""
    owner = await make_user()
    created = await client.post(
        "/api/v1/users/me/api-keys", json={"name": "server"}, headers=owner.headers
    )
    api_key = {"X-API-Key": created.json()["data"]["api_key"]}
    limiter = app.state.rate_limiter
    script = limiter._windows._acquire
    calls: list[int] = []

    async def counting(*, keys: list[str], args: list[object]) -> object:
        calls.append(len(keys))
        return await script(keys=keys, args=args)

    monkeypatch.setattr(limiter._windows, "_acquire", counting)
    response = await client.get("/api/v1/sms/quota", headers=api_key)

    assert response.status_code == 200
    # The key's two windows in one call, then its owner's two in another.
    assert calls == [2, 2]
