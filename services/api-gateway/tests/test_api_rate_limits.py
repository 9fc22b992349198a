import asyncio
from typing import Any

import pytest
from api_test_helpers import MakeUser, count_rows, register_device, send_sms
from fastapi import FastAPI
from httpx import ASGITransport, AsyncClient, Response
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.envelope import RateLimitedErrorBody
from mensajero_api.main import create_app
from mensajero_api.ratelimits import limiter as limiter_module
from mensajero_api.ratelimits.limiter import RequestRateLimiter
from mensajero_common.keys import RedisKeys
from mensajero_common.models import SMSMessage
from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, scaled
from mensajero_common.throttle import InvalidLimitSettingError

QUOTA_URL = "/api/v1/sms/quota"
PLANS_URL = "/api/v1/sms/plans"
LOGIN_URL = "/api/v1/login/access-token"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "RATE_LIMIT_PER_USER": "3/minute",
            "RATE_LIMIT_PER_API_KEY": "2/minute",
            "RATE_LIMIT_PER_IP": "5/minute",
            "RATE_LIMIT_LOGIN_PER_IP": "2/minute",
        }
    )


def _assert_rate_limited(response: Response, limit: str) -> int:
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["success"] is False
    assert body["error"] == "rate_limited"
    assert body["limit"] == limit
    retry_after: int = body["retry_after"]
    assert response.headers["retry-after"] == str(retry_after)
    # The body is the one the OpenAPI schema gives for this 429.
    RateLimitedErrorBody.model_validate(body)
    return retry_after


async def test_user_limit_edge(
    client: AsyncClient,
    make_user: MakeUser,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    owner = await make_user()

    allowed = [await client.get(QUOTA_URL, headers=owner.headers) for _ in range(3)]
    refused = await client.get(QUOTA_URL, headers=owner.headers)

    assert [response.status_code for response in allowed] == [200] * 3
    retry_after = _assert_rate_limited(refused, "3/minute")
    assert 1 <= retry_after <= 60
    assert refused.headers["content-language"] == "es"
    assert refused.json()["message"] == (
        f"Demasiadas solicitudes: el límite es 3 por minuto. "
        f"Inténtalo de nuevo en {retry_after} s."
    )
    assert await redis.keys(f"{redis_keys.rate_limit_prefix}:*")


async def test_rate_limited_message_in_english(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    for _ in range(3):
        await client.get(QUOTA_URL, headers=owner.headers)

    refused = await client.get(
        QUOTA_URL, headers={**owner.headers, "Accept-Language": "en"}
    )

    retry_after = _assert_rate_limited(refused, "3/minute")
    assert refused.json()["message"] == (
        f"Too many requests: the limit is 3 per minute. Try again in {retry_after} s."
    )


async def test_user_limit_spans_endpoints(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()

    await client.get(QUOTA_URL, headers=owner.headers)
    await client.get(PLANS_URL, headers=owner.headers)
    await client.get("/api/v1/users/me", headers=owner.headers)
    refused = await client.get(PLANS_URL, headers=owner.headers)

    _assert_rate_limited(refused, "3/minute")


async def test_users_limited_separately(
    client: AsyncClient, make_user: MakeUser
) -> None:
    first = await make_user()
    second = await make_user()
    for _ in range(3):
        await client.get(QUOTA_URL, headers=first.headers)

    refused = await client.get(QUOTA_URL, headers=first.headers)
    other = await client.get(QUOTA_URL, headers=second.headers)

    _assert_rate_limited(refused, "3/minute")
    assert other.status_code == 200


async def test_limited_send_creates_nothing(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="pro")

    responses = [await send_sms(client, owner, body=f"m{n}") for n in range(4)]

    assert [response.status_code for response in responses[:3]] == [201] * 3
    _assert_rate_limited(responses[3], "3/minute")
    assert await count_rows(session_factory, SMSMessage) == 3


async def test_parallel_burst_allows_exactly_limit(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()

    responses = await asyncio.gather(
        *(client.get(QUOTA_URL, headers=owner.headers) for _ in range(12))
    )

    codes = sorted(response.status_code for response in responses)
    assert codes == [200] * 3 + [429] * 9


async def test_anonymous_limit_per_ip(client: AsyncClient) -> None:
    # Requests without a token, or with an invalid one, count for the client's address.
    anonymous = [await client.get(PLANS_URL) for _ in range(3)]
    bad_token = [
        await client.get(PLANS_URL, headers={"Authorization": "Bearer nonsense"})
        for _ in range(2)
    ]
    refused = await client.get(PLANS_URL)

    assert [r.status_code for r in anonymous + bad_token] == [401] * 5
    _assert_rate_limited(refused, "5/minute")


async def test_ipv6_limit_per_network(app: FastAPI) -> None:
    # One host picks new addresses inside its /64, so the /64 is what counts.
    async def plans_from(address: str) -> Response:
        transport = ASGITransport(app=app, client=(address, 40000))
        async with AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(PLANS_URL)

    same_network = [await plans_from(f"2001:db8:1:2::{host}") for host in range(1, 6)]
    rejected = await plans_from("2001:db8:1:2:ffff::9")
    other_network = await plans_from("2001:db8:1:3::1")

    assert [r.status_code for r in same_network] == [401] * 5
    _assert_rate_limited(rejected, "5/minute")
    assert other_network.status_code == 401


async def test_login_limit_per_ipv6_network(app: FastAPI, make_user: MakeUser) -> None:
    owner = await make_user()
    credentials = {"username": owner.email, "password": "wrong password"}

    async def login_from(address: str) -> Response:
        transport = ASGITransport(app=app, client=(address, 40000))
        async with AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(LOGIN_URL, data=credentials)

    attempts = [await login_from(f"2001:db8:9:9::{host}") for host in (1, 2)]
    rejected = await login_from("2001:db8:9:9::3")

    assert [response.status_code for response in attempts] == [401, 401]
    _assert_rate_limited(rejected, "2/minute")


async def test_api_key_limit_per_key(
    client: AsyncClient, redis: Redis, redis_keys: RedisKeys
) -> None:
    first_key = {"X-API-Key": "mak_first-key-for-rate-limits"}
    second_key = {"X-API-Key": "mak_second-key-for-rate-limits"}

    allowed = [await client.get(PLANS_URL, headers=first_key) for _ in range(2)]
    refused = await client.get(PLANS_URL, headers=first_key)
    other = await client.get(PLANS_URL, headers=second_key)

    assert all(response.status_code != 429 for response in allowed)
    _assert_rate_limited(refused, "2/minute")
    assert other.status_code != 429
    stored = [key.decode() for key in await redis.keys(f"{redis_keys.prefix}:*")]
    assert not any("first-key" in key for key in stored)


async def test_made_up_api_keys_limited_per_ip(
    app: FastAPI, client: AsyncClient, make_user: MakeUser
) -> None:
    # Each made-up key has a count of its own, so a new key per request would escape
    # RATE_LIMIT_PER_IP without a count of failed keys per address.
    owner = await make_user()
    created = await client.post(
        "/api/v1/users/me/api-keys", json={"name": "server"}, headers=owner.headers
    )
    assert created.status_code == 201, created.text
    valid_key = {"X-API-Key": created.json()["data"]["api_key"]}
    device = await register_device(client, owner)

    attempts = [
        await client.get(PLANS_URL, headers={"X-API-Key": f"mak_made-up-{index}"})
        for index in range(4)
    ]
    attempts.append(
        await client.get(PLANS_URL, headers={"X-API-Key": device["api_key"]})
    )
    refused = await client.get(PLANS_URL, headers={"X-API-Key": "mak_made-up-5"})
    refused_valid = await client.get(PLANS_URL, headers=valid_key)
    transport = ASGITransport(app=app, client=("192.0.2.7", 40000))
    async with AsyncClient(transport=transport, base_url="http://test") as other:
        elsewhere = await other.get(PLANS_URL, headers=valid_key)
    anonymous = await client.get(PLANS_URL)

    assert [response.status_code for response in attempts] == [401] * 5
    _assert_rate_limited(refused, "5/minute")
    _assert_rate_limited(refused_valid, "5/minute")
    assert elsewhere.status_code == 200, elsewhere.text
    assert anonymous.status_code == 401


async def test_valid_api_keys_skip_failure_count(
    app: FastAPI, client: AsyncClient, make_user: MakeUser, monkeypatch
) -> None:
    owner = await make_user()
    created = await client.post(
        "/api/v1/users/me/api-keys", json={"name": "server"}, headers=owner.headers
    )
    valid_key = {"X-API-Key": created.json()["data"]["api_key"]}
    limiter = app.state.rate_limiter
    tested: list[str] = []
    test_failures = limiter._test_api_key_failures

    async def counting_test(address: str) -> Any:
        tested.append(address)
        return await test_failures(address)

    monkeypatch.setattr(limiter, "_test_api_key_failures", counting_test)

    # An address without a failed key costs no call to the failure count.
    assert (await client.get(PLANS_URL, headers=valid_key)).status_code == 200
    assert tested == []
    # After a failure, that address is tested before every lookup, others are not.
    failed = await client.get(PLANS_URL, headers={"X-API-Key": "mak_made-up"})
    assert failed.status_code == 401
    assert (await client.get(PLANS_URL, headers=valid_key)).status_code == 200
    assert len(tested) == 1
    transport = ASGITransport(app=app, client=("192.0.2.7", 40000))
    async with AsyncClient(transport=transport, base_url="http://test") as other:
        # The key's third request in the minute, past RATE_LIMIT_PER_API_KEY.
        refused = await other.get(PLANS_URL, headers=valid_key)
    _assert_rate_limited(refused, "2/minute")
    assert len(tested) == 1


async def test_revoked_token_spares_user_limit(
    client: AsyncClient, make_user: MakeUser
) -> None:
    # A token revoked by a password change keeps a valid signature, so the middleware
    # counts it against its user before authentication rejects it.
    owner = await make_user()
    changed = await client.put(
        "/api/v1/users/me/password",
        json={
            "current_password": owner.password,
            "new_password": "another long password",
        },
        headers=owner.headers,
    )
    assert changed.status_code == 200, changed.text
    new_token = {"Authorization": f"Bearer {changed.json()['data']['access_token']}"}

    revoked = [await client.get(QUOTA_URL, headers=owner.headers) for _ in range(5)]
    refused_revoked = await client.get(QUOTA_URL, headers=owner.headers)
    # The password change took one of the user's 3 requests a minute.
    allowed = [await client.get(QUOTA_URL, headers=new_token) for _ in range(2)]
    refused = await client.get(QUOTA_URL, headers=new_token)

    assert [response.status_code for response in revoked] == [401] * 5
    assert all(response.json()["error"] == "invalid_token" for response in revoked)
    # Past RATE_LIMIT_PER_IP in the count of failed credentials of this address.
    _assert_rate_limited(refused_revoked, "5/minute")
    assert [response.status_code for response in allowed] == [200, 200]
    _assert_rate_limited(refused, "3/minute")


def test_failing_addresses_stay_bounded(app: FastAPI, monkeypatch) -> None:
    monkeypatch.setattr(limiter_module, "MAX_FAILING_ADDRESSES", 3)
    limiter = RequestRateLimiter(
        app.state.rate_limit_rules, app.state.settings, Redis(), RedisKeys("bounded")
    )

    for index in range(5):
        limiter._remember_failure(f"192.0.2.{index}")
    limiter._remember_failure("192.0.2.2")

    assert list(limiter._failing_addresses) == ["192.0.2.3", "192.0.2.4", "192.0.2.2"]
    assert limiter._failed_lately("192.0.2.2")
    assert not limiter._failed_lately("192.0.2.0")


async def test_check_user_shares_user_limit(
    app: FastAPI, client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    limiter = app.state.rate_limiter

    assert await limiter.check_user(owner.id) is None
    assert await limiter.check_user(owner.id) is None
    allowed = await client.get(QUOTA_URL, headers=owner.headers)
    refused = await client.get(QUOTA_URL, headers=owner.headers)
    refused_again = await limiter.check_user(owner.id)

    assert allowed.status_code == 200
    _assert_rate_limited(refused, "3/minute")
    assert refused_again is not None
    assert refused_again.code == "rate_limited"


async def test_api_keys_share_user_limit(
    settings: Settings, make_user: MakeUser, redis: Redis
) -> None:
    owner = await make_user()
    limits = settings.model_copy(update={"RATE_LIMIT_PER_API_KEY": "10/minute"})

    async def requests(client: AsyncClient) -> list[Response]:
        created = await client.post(
            "/api/v1/users/me/api-keys", json={"name": "server"}, headers=owner.headers
        )
        assert created.status_code == 201, created.text
        key = {"X-API-Key": created.json()["data"]["api_key"]}
        with_key = [await client.get(QUOTA_URL, headers=key) for _ in range(3)]
        with_token = await client.get(QUOTA_URL, headers=owner.headers)
        return [*with_key, with_token]

    responses = await _with_app(limits, requests)

    # The key creation took one of the user's 3 requests a minute.
    assert [r.status_code for r in responses[:2]] == [200, 200]
    _assert_rate_limited(responses[2], "3/minute")
    _assert_rate_limited(responses[3], "3/minute")


async def test_login_limit_per_ip(client: AsyncClient, make_user: MakeUser) -> None:
    owner = await make_user()
    credentials = {"username": owner.email, "password": "wrong password"}

    attempts = [await client.post(LOGIN_URL, data=credentials) for _ in range(2)]
    refused = await client.post(
        LOGIN_URL, data={"username": owner.email, "password": owner.password}
    )
    # The login limit counts only logins and sign-ups; reading data is limited per user.
    other = await client.get(QUOTA_URL, headers=owner.headers)

    assert [response.status_code for response in attempts] == [401, 401]
    _assert_rate_limited(refused, "2/minute")
    assert other.status_code == 200


async def test_health_and_docs_not_limited(client: AsyncClient) -> None:
    responses = [await client.get("/healthz") for _ in range(8)]
    responses.append(await client.get("/openapi.json"))

    assert {response.status_code for response in responses} == {200}


async def _with_app(settings: Settings, requests: Any) -> list[Response]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app)
        async with AsyncClient(transport=transport, base_url="http://test") as client:
            result: list[Response] = await requests(client)
            return result


async def test_several_windows_each_apply(
    settings: Settings, make_user: MakeUser, redis: Redis
) -> None:
    owner = await make_user()
    # Two seconds, so that three requests fit in the window even on a loaded machine.
    windows = settings.model_copy(
        update={"RATE_LIMIT_PER_USER": "2 per 2 seconds;3/minute"}
    )

    async def requests(client: AsyncClient) -> list[Response]:
        burst = [await client.get(QUOTA_URL, headers=owner.headers) for _ in range(3)]
        # The moving window frees each slot two seconds after it was taken.
        await asyncio.sleep(2.05)
        later = [await client.get(QUOTA_URL, headers=owner.headers) for _ in range(2)]
        return burst + later

    responses = await _with_app(windows, requests)

    assert [r.status_code for r in responses[:2]] == [200, 200]
    assert _assert_rate_limited(responses[2], "2/2 seconds") in (1, 2)
    # The refused request was not counted by the per-minute window: one more fits.
    assert responses[3].status_code == 200
    _assert_rate_limited(responses[4], "3/minute")


async def test_disabled_limits(
    settings: Settings, make_user: MakeUser, redis: Redis
) -> None:
    owner = await make_user()
    disabled = settings.model_copy(update={"RATE_LIMIT_ENABLED": False})

    async def requests(client: AsyncClient) -> list[Response]:
        return [await client.get(QUOTA_URL, headers=owner.headers) for _ in range(6)]

    responses = await _with_app(disabled, requests)

    assert {response.status_code for response in responses} == {200}


async def test_redis_down_lets_requests_through(
    settings: Settings, make_user: MakeUser
) -> None:
    owner = await make_user()
    # Nothing listens on a port just taken from the OS and released.
    unreachable = settings.model_copy(
        update={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    )

    async def requests(client: AsyncClient) -> list[Response]:
        async with asyncio.timeout(scaled(10)):
            return [
                await client.get(QUOTA_URL, headers=owner.headers) for _ in range(5)
            ]

    responses = await _with_app(unreachable, requests)

    assert {response.status_code for response in responses} == {200}


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("RATE_LIMIT_PER_USER", "lots"),
        ("RATE_LIMIT_PER_IP", "10 per fortnight"),
        ("RATE_LIMIT_PER_API_KEY", "-1/second"),
        ("RATE_LIMIT_LOGIN_PER_IP", ""),
        ("RATE_LIMIT_PER_IP", "0/minute"),
    ],
)
def test_invalid_setting_stops_start(
    settings: Settings, setting: str, value: str
) -> None:
    broken = settings.model_copy(update={setting: value})

    with pytest.raises(InvalidLimitSettingError, match=setting):
        create_app(broken)
