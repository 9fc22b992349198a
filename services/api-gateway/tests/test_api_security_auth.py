"""Login throttling, passwords, token lifetime, CORS, mass assignment and exposure."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import jwt
import pytest
from api_test_helpers import ApiUser
from fastapi import FastAPI
from httpx import ASGITransport, AsyncClient
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.envelope import TooManyLoginAttemptsErrorBody
from mensajero_api.main import create_app
from mensajero_common.models import User
from mensajero_common.settings import Settings

LOGIN_PATH = "/api/v1/login/access-token"
PASSWORD_PATH = "/api/v1/users/me/password"
ALLOWED_ORIGIN = "https://panel.example.com"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The throttle is under test here, not the request rate limits.
    return settings.model_copy(
        update={
            "RATE_LIMIT_ENABLED": False,
            "LOGIN_FAILURES_PER_ACCOUNT": "3/minute",
            "LOGIN_FAILURES_PER_IP": "8/minute",
        }
    )


async def login(client: AsyncClient, email: str, password: str) -> int:
    response = await client.post(
        LOGIN_PATH, data={"username": email, "password": password}
    )
    return response.status_code


async def test_account_throttled_after_failures(
    client: AsyncClient, user: ApiUser
) -> None:
    failures = [await login(client, user.email, "wrong password") for _ in range(3)]
    throttled = await client.post(
        LOGIN_PATH, data={"username": user.email, "password": user.password}
    )

    assert failures == [401, 401, 401]
    assert throttled.status_code == 429
    assert throttled.json()["error"] == "too_many_login_attempts"
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60
    assert throttled.json()["retry_after"] == int(throttled.headers["Retry-After"])
    TooManyLoginAttemptsErrorBody.model_validate(throttled.json())


async def test_throttle_ignores_email_case(client: AsyncClient, user: ApiUser) -> None:
    for email in (user.email.upper(), user.email, f" {user.email.title()}"):
        await login(client, email, "wrong password")

    assert await login(client, user.email, user.password) == 429


async def test_throttle_counts_email_spellings_once(client: AsyncClient) -> None:
    password = "s3cret-pass"
    signup = await client.post(
        "/api/v1/users/signup", json={"email": "zoe@exämple.com", "password": password}
    )
    assert signup.status_code == 201, signup.text

    for email in ("zoe@xn--exmple-cua.com", "zoe@exa\u0308mple.com", "zoe@exämple.com"):
        await login(client, email, "wrong password")

    assert await login(client, "zoe@exämple.com", password) == 429


async def test_throttle_counts_compatibility_forms_once(
    client: AsyncClient, user: ApiUser
) -> None:
    local_part, _, domain = user.email.partition("@")
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in local_part) + "@" + domain
    for email in (fullwidth, user.email, fullwidth.upper()):
        await login(client, email, "wrong password")

    assert await login(client, user.email, user.password) == 429


async def test_unknown_email_throttled_alike(client: AsyncClient) -> None:
    statuses = [
        await login(client, "nobody@example.com", "wrong password") for _ in range(4)
    ]

    assert statuses == [401, 401, 401, 429]


async def test_success_clears_account_failures(
    client: AsyncClient, user: ApiUser
) -> None:
    for _ in range(2):
        await login(client, user.email, "wrong password")
    assert await login(client, user.email, user.password) == 200

    statuses = [await login(client, user.email, "wrong password") for _ in range(3)]

    assert statuses == [401, 401, 401]


async def test_address_throttled_across_accounts(client: AsyncClient) -> None:
    statuses = [
        await login(client, f"guess{index}@example.com", "wrong password")
        for index in range(9)
    ]

    assert statuses == [401] * 8 + [429]


async def test_other_account_unaffected(client: AsyncClient, user: ApiUser) -> None:
    for _ in range(3):
        await login(client, "victim@example.com", "wrong password")

    assert await login(client, user.email, user.password) == 200


@pytest.mark.parametrize(
    ("password", "status", "error"),
    [
        ("alice.smith@example.com", 400, "weak_password"),
        ("ALICE.SMITH", 400, "weak_password"),
        ("my-alice.smith-2026", 400, "weak_password"),
        ("short7!", 422, "validation_error"),
    ],
)
async def test_signup_rejects_weak_password(
    client: AsyncClient, password: str, status: int, error: str
) -> None:
    response = await client.post(
        "/api/v1/users/signup",
        json={"email": "alice.smith@example.com", "password": password},
    )

    assert response.status_code == status
    assert response.json()["error"] == error
    assert password not in response.text


async def test_short_local_part_allows_substring(client: AsyncClient) -> None:
    response = await client.post(
        "/api/v1/users/signup",
        json={"email": "al@example.com", "password": "totally-alright-pass"},
    )

    assert response.status_code == 201, response.text


async def test_password_change_revokes_tokens(
    client: AsyncClient, user: ApiUser
) -> None:
    new_password = "a brand new passphrase"

    changed = await client.put(
        PASSWORD_PATH,
        json={"current_password": user.password, "new_password": new_password},
        headers=user.headers,
    )
    new_token = changed.json()["data"]["access_token"]
    old_token_me = await client.get("/api/v1/users/me", headers=user.headers)
    new_token_me = await client.get(
        "/api/v1/users/me", headers={"Authorization": f"Bearer {new_token}"}
    )

    assert changed.status_code == 200, changed.text
    assert old_token_me.status_code == 401
    assert old_token_me.json()["error"] == "invalid_token"
    assert new_token_me.status_code == 200
    assert await login(client, user.email, user.password) == 401
    assert await login(client, user.email, new_password) == 200


async def test_password_change_wrong_current(
    client: AsyncClient, user: ApiUser
) -> None:
    response = await client.put(
        PASSWORD_PATH,
        json={"current_password": "not it", "new_password": "another passphrase"},
        headers=user.headers,
    )
    me = await client.get("/api/v1/users/me", headers=user.headers)

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_current_password"
    assert me.status_code == 200
    assert await login(client, user.email, user.password) == 200


async def test_password_change_weak_new(client: AsyncClient, user: ApiUser) -> None:
    local_part = user.email.split("@")[0]

    response = await client.put(
        PASSWORD_PATH,
        json={"current_password": user.password, "new_password": f"{local_part}123"},
        headers=user.headers,
    )

    assert response.status_code == 400
    assert response.json()["error"] == "weak_password"
    assert response.json()["field"] == "new_password"
    assert await login(client, user.email, user.password) == 200


async def test_password_change_same_password(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with session_factory() as session:
        before = await session.scalar(select(User).where(User.email == user.email))
    assert before is not None
    body = {"current_password": user.password, "new_password": user.password}

    spanish = await client.put(PASSWORD_PATH, json=body, headers=user.headers)
    english = await client.put(
        PASSWORD_PATH, json=body, headers={**user.headers, "Accept-Language": "en"}
    )
    me = await client.get("/api/v1/users/me", headers=user.headers)
    async with session_factory() as session:
        after = await session.scalar(select(User).where(User.email == user.email))

    assert spanish.status_code == 400
    assert spanish.json()["error"] == "password_unchanged"
    assert spanish.json()["field"] == "new_password"
    assert spanish.json()["message"] == (
        "La contraseña nueva es igual a la actual: elige una distinta."
    )
    assert english.status_code == 400
    assert english.json()["error"] == "password_unchanged"
    assert english.json()["message"] == (
        "The new password is the same as the current one: choose a different one."
    )
    assert me.status_code == 200
    assert after is not None
    assert after.hashed_password == before.hashed_password
    assert after.token_version == before.token_version
    assert await login(client, user.email, user.password) == 200


async def test_concurrent_password_changes_one_wins(
    client: AsyncClient, user: ApiUser
) -> None:
    new_passwords = [f"new passphrase {index}" for index in range(3)]

    responses = await asyncio.gather(
        *[
            client.put(
                PASSWORD_PATH,
                json={"current_password": user.password, "new_password": password},
                headers=user.headers,
            )
            for password in new_passwords
        ]
    )

    statuses = [response.status_code for response in responses]
    assert sorted(statuses) == [200, 401, 401]
    winner = statuses.index(200)
    losers = [response for response in responses if response.status_code == 401]
    assert all(response.json()["error"] == "invalid_token" for response in losers)
    token = responses[winner].json()["data"]["access_token"]
    me = await client.get(
        "/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}
    )
    assert me.status_code == 200
    assert await login(client, user.email, new_passwords[winner]) == 200


async def test_password_change_guessing_throttled(
    client: AsyncClient, user: ApiUser
) -> None:
    statuses = []
    for index in range(4):
        response = await client.put(
            PASSWORD_PATH,
            json={
                "current_password": f"guess number {index}",
                "new_password": "another passphrase",
            },
            headers=user.headers,
        )
        statuses.append(response.status_code)

    assert statuses == [400, 400, 400, 429]


@pytest.fixture
async def short_token_client(settings: Settings) -> AsyncIterator[AsyncClient]:
    application = create_app(
        settings.model_copy(update={"ACCESS_TOKEN_EXPIRE_MINUTES": 7})
    )
    async with application.router.lifespan_context(application):
        transport = ASGITransport(app=application)
        async with AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def test_token_lifetime_follows_setting(
    short_token_client: AsyncClient, user: ApiUser, settings: Settings
) -> None:
    response = await short_token_client.post(
        LOGIN_PATH, data={"username": user.email, "password": user.password}
    )
    body = response.json()
    claims = jwt.decode(body["access_token"], settings.SECRET_KEY, algorithms=["HS256"])

    assert body["expires_in"] == 7 * 60
    assert claims["exp"] - claims["iat"] == 7 * 60
    assert claims["exp"] > datetime.now(UTC).timestamp()


@pytest.fixture
async def cors_app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(
        settings.model_copy(update={"BACKEND_CORS_ORIGINS": [ALLOWED_ORIGIN]})
    )
    async with application.router.lifespan_context(application):
        yield application


def preflight_headers(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, content-type",
    }


async def test_cors_allows_listed_origin(cors_app: FastAPI) -> None:
    transport = ASGITransport(app=cors_app)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        preflight = await client.options(
            "/api/v1/sms/send", headers=preflight_headers(ALLOWED_ORIGIN)
        )
        unauthorized = await client.get(
            "/api/v1/users/me", headers={"Origin": ALLOWED_ORIGIN}
        )

    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    assert unauthorized.status_code == 401
    assert unauthorized.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


async def test_cors_rejects_other_origin(cors_app: FastAPI) -> None:
    transport = ASGITransport(app=cors_app)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        preflight = await client.options(
            "/api/v1/sms/send", headers=preflight_headers("https://evil.example")
        )
        simple = await client.get(
            "/healthz", headers={"Origin": "https://evil.example"}
        )

    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in simple.headers


async def test_cors_off_without_origins(client: AsyncClient) -> None:
    response = await client.get("/healthz", headers={"Origin": ALLOWED_ORIGIN})

    assert "access-control-allow-origin" not in response.headers


def test_cors_wildcard_with_credentials_rejected() -> None:
    with pytest.raises(ValidationError, match="BACKEND_CORS_ALLOW_CREDENTIALS"):
        Settings(_env_file=None, BACKEND_CORS_ORIGINS="*")

    without_credentials = Settings(
        _env_file=None, BACKEND_CORS_ORIGINS="*", BACKEND_CORS_ALLOW_CREDENTIALS=False
    )
    assert without_credentials.BACKEND_CORS_ORIGINS == ["*"]


@pytest.mark.parametrize(
    "origins",
    ["ftp://panel.example.com", "https://panel.example.com/app", "panel.example.com"],
)
def test_cors_invalid_origin_rejected(origins: str) -> None:
    with pytest.raises(ValidationError, match="invalid CORS origin"):
        Settings(_env_file=None, BACKEND_CORS_ORIGINS=origins)


def test_cors_origins_from_list_or_commas() -> None:
    from_commas = Settings(
        _env_file=None,
        BACKEND_CORS_ORIGINS="https://A.example.com/, http://localhost:5173",
    )
    from_json = Settings(
        _env_file=None, BACKEND_CORS_ORIGINS='["https://a.example.com"]'
    )

    assert from_commas.BACKEND_CORS_ORIGINS == [
        "https://a.example.com",
        "http://localhost:5173",
    ]
    assert from_json.BACKEND_CORS_ORIGINS == ["https://a.example.com"]


def test_key_prefixes_must_differ() -> None:
    with pytest.raises(ValidationError, match="USER_API_KEY_PREFIX"):
        Settings(_env_file=None, USER_API_KEY_PREFIX="mdk_user_")


def test_malformed_throttle_setting_stops_start(settings: Settings) -> None:
    with pytest.raises(ValueError, match="LOGIN_FAILURES_PER_IP"):
        create_app(settings.model_copy(update={"LOGIN_FAILURES_PER_IP": "lots"}))


async def test_signup_rejects_privileged_fields(
    client: AsyncClient, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    response = await client.post(
        "/api/v1/users/signup",
        json={
            "email": "mallory@example.com",
            "password": "a long enough passphrase",
            "is_superuser": True,
            "is_active": False,
            "token_version": 99,
            "hashed_password": "x",
        },
    )

    async with session_factory() as session:
        row = (
            await session.scalars(
                select(User).where(User.email == "mallory@example.com")
            )
        ).one_or_none()
    assert response.status_code == 422, response.text
    fields = {item["field"] for item in response.json()["details"]}
    assert fields == {"is_superuser", "is_active", "token_version", "hashed_password"}
    assert row is None


async def test_profile_update_rejects_privileged_fields(
    client: AsyncClient, user: ApiUser
) -> None:
    response = await client.patch(
        "/api/v1/users/me",
        json={"is_superuser": True, "email": "other@example.com", "full_name": "Eve"},
        headers=user.headers,
    )
    me = await client.get("/api/v1/users/me", headers=user.headers)

    assert response.status_code == 422, response.text
    assert me.json()["data"]["is_superuser"] is False
    assert me.json()["data"]["email"] == user.email
    assert me.json()["data"]["full_name"] != "Eve"


async def test_responses_expose_no_secrets(client: AsyncClient, user: ApiUser) -> None:
    await client.post(
        "/api/v1/sms/devices", json={"name": "Pixel"}, headers=user.headers
    )
    await client.post(
        "/api/v1/sms/webhooks",
        json={"url": "http://127.0.0.1:9/hook", "secret_key": "s" * 32},
        headers=user.headers,
    )
    await client.post(
        "/api/v1/users/me/api-keys", json={"name": "server"}, headers=user.headers
    )

    for path in (
        "/api/v1/users/me",
        "/api/v1/sms/devices",
        "/api/v1/sms/webhooks",
        "/api/v1/users/me/api-keys",
    ):
        response = await client.get(path, headers=user.headers)
        assert response.status_code == 200, path
        for name in ("hashed_password", "key_hash", "api_key_hash", "secret_key"):
            assert name not in response.text, f"{path} shows {name}"
        assert "s" * 32 not in response.text, path
