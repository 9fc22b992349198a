"""The moving windows behind the rate limits, on Redis, against the `limits` package."""

import asyncio
import time

import pytest
from api_test_helpers import ApiUser, MakeUser
from fastapi import FastAPI
from httpx import AsyncClient
from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from mensajero_api.ratelimits.windows import MovingWindows, Window
from mensajero_common.keys import RedisKeys
from mensajero_common.settings import Settings

QUOTA_URL = "/api/v1/sms/quota"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Two windows per rule, as in the defaults, with a per-user count that a test can
    # reach.
    return settings.model_copy(
        update={
            "RATE_LIMIT_PER_USER": "100/second;7/minute",
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


async def _create_key(client: AsyncClient, owner: ApiUser) -> tuple[str, str]:
    created = await client.post(
        "/api/v1/users/me/api-keys", json={"name": "server"}, headers=owner.headers
    )
    data = created.json()["data"]
    return data["id"], data["api_key"]


def _count_calls(monkeypatch: pytest.MonkeyPatch, app: FastAPI) -> list[list[str]]:
    """Record the Redis keys of each call of the rate limiter's script."""
    windows = app.state.rate_limiter._windows
    script = windows._acquire
    calls: list[list[str]] = []

    async def counting(*, keys: list[str], args: list[object]) -> object:
        calls.append(keys)
        return await script(keys=keys, args=args)

    monkeypatch.setattr(windows, "_acquire", counting)
    return calls


def _counts_user(keys: list[str], owner: ApiUser) -> bool:
    return any(f"/user/{owner.id}/" in key for key in keys)


async def test_known_api_key_takes_one_call(
    app: FastAPI, client: AsyncClient, make_user: MakeUser, monkeypatch
) -> None:
    owner = await make_user()
    _, api_key = await _create_key(client, owner)
    calls = _count_calls(monkeypatch, app)

    first = await client.get(QUOTA_URL, headers={"X-API-Key": api_key})
    second = await client.get(QUOTA_URL, headers={"X-API-Key": api_key})

    assert first.status_code == 200
    assert second.status_code == 200
    # The first request counts the key's two windows, then its owner's two once the
    # key has authenticated. The second counts all four in one call.
    assert [len(keys) for keys in calls] == [2, 2, 4]
    assert _counts_user(calls[1], owner)
    assert _counts_user(calls[2], owner)


async def test_known_key_keeps_user_limit(
    app: FastAPI, client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    _, api_key = await _create_key(client, owner)
    limiter = app.state.rate_limiter
    # Four requests of the owner's bearer token: with the key's creation, five.
    for _ in range(4):
        assert await limiter.check_user(owner.id) is None

    responses = [
        await client.get(QUOTA_URL, headers={"X-API-Key": api_key}) for _ in range(3)
    ]

    assert responses[0].status_code == 200
    assert responses[1].status_code == 200
    # The owner's eighth request in the minute, counted in one call with the key's.
    assert responses[2].status_code == 429
    assert responses[2].json()["limit"] == "7/minute"


async def _user_counts(redis: Redis, app: FastAPI, owner: ApiUser) -> list[int]:
    """Return the requests in each of `owner`'s per-user windows."""
    limiter = app.state.rate_limiter
    windows = limiter._windows_of([(limiter.rules.per_user, str(owner.id))])
    return [await redis.llen(limiter._windows.key(window)) for window in windows]


async def _known_then_revoked(client: AsyncClient, owner: ApiUser) -> str:
    """Create a key, authenticate with it once so the API keeps its owner, revoke it."""
    key_id, api_key = await _create_key(client, owner)
    known = await client.get(QUOTA_URL, headers={"X-API-Key": api_key})
    assert known.status_code == 200
    revoked = await client.delete(
        f"/api/v1/users/me/api-keys/{key_id}", headers=owner.headers
    )
    assert revoked.status_code == 200
    return api_key


async def test_revoked_key_forgotten(
    app: FastAPI, client: AsyncClient, make_user: MakeUser, monkeypatch
) -> None:
    owner = await make_user()
    api_key = await _known_then_revoked(client, owner)
    calls = _count_calls(monkeypatch, app)

    first = await client.get(QUOTA_URL, headers={"X-API-Key": api_key})
    counted_first = [keys for keys in calls if _counts_user(keys, owner)]
    calls.clear()
    second = await client.get(QUOTA_URL, headers={"X-API-Key": api_key})

    assert first.status_code == 401
    assert second.status_code == 401
    # The owner was known, so the first request counted against the owner's windows.
    assert len(counted_first) == 1
    # The failure made the key unknown again: the second counts only per key.
    assert not any(_counts_user(keys, owner) for keys in calls)


async def test_revoked_key_burst_spares_owner(
    app: FastAPI, client: AsyncClient, make_user: MakeUser, redis: Redis
) -> None:
    owner = await make_user()
    api_key = await _known_then_revoked(client, owner)
    before = await _user_counts(redis, app, owner)

    # Requests that all start before the first failure returns.
    burst = await asyncio.gather(
        *(client.get(QUOTA_URL, headers={"X-API-Key": api_key}) for _ in range(20))
    )
    after = await _user_counts(redis, app, owner)
    own = await client.get(QUOTA_URL, headers=owner.headers)

    assert {response.status_code for response in burst} <= {401, 429}
    # Each failed request was taken out of the owner's windows again.
    assert after == before
    assert own.status_code == 200


async def test_revoked_key_gets_401_while_owner_full(
    app: FastAPI, client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    api_key = await _known_then_revoked(client, owner)
    limiter = app.state.rate_limiter
    # Fill the owner's 7 per minute: the key's creation, its first request and the
    # revocation took three.
    for _ in range(4):
        assert await limiter.check_user(owner.id) is None
    assert await limiter.check_user(owner.id) is not None

    response = await client.get(QUOTA_URL, headers={"X-API-Key": api_key})

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_api_key"
