"""Every endpoint with a missing, forged, expired or revoked credential, or a device key.

The test walks every route of the app: each one either authenticates through CurrentUser
or is on the short public list below, and every authenticated one answers 401 to every
bad credential without changing a row in Postgres or a key in Redis.
"""

import re
import uuid
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from api_test_helpers import ApiUser, MakeUser, register_device
from fastapi import FastAPI
from httpx import AsyncClient
from redis.asyncio import Redis
from security_helpers import (
    API_KEYS_PATH,
    api_routes,
    create_api_key,
    requires_credentials,
    snapshot_tables,
)
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.auth.security import create_access_token
from mensajero_common.models import User, UserApiKey
from mensajero_common.settings import Settings

Sessions = async_sessionmaker[AsyncSession]

PUBLIC_ROUTES = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/api/v1/login/access-token"),
    ("POST", "/api/v1/users/signup"),
}
PATH_PARAMETER = re.compile(r"{(\w+)}")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"RATE_LIMIT_ENABLED": False})


async def _bad_credentials(
    client: AsyncClient,
    settings: Settings,
    session_factory: Sessions,
    owner: ApiUser,
) -> dict[str, dict[str, str]]:
    """Build every kind of credential that must not open the API, for `owner`'s account."""
    device = await register_device(client, owner)
    revoked = await create_api_key(client, owner, name="revoked")
    await client.delete(f"{API_KEYS_PATH}/{revoked['id']}", headers=owner.headers)
    expired = await create_api_key(client, owner, name="expired", expires_in_days=1)
    async with session_factory() as session:
        await session.execute(
            update(UserApiKey)
            .where(UserApiKey.id == uuid.UUID(expired["id"]))
            .values(expires_at=datetime.now(UTC) - timedelta(minutes=1))
        )
        # Tokens carrying version 0 were issued before a password change.
        await session.execute(
            update(User).where(User.id == owner.id).values(token_version=1)
        )
        await session.commit()

    now = datetime.now(UTC)
    forged = jwt.encode(
        {"sub": str(owner.id), "ver": 1, "iat": now, "exp": now + timedelta(hours=1)},
        "not-the-server-secret-but-long-enough-for-hs256",
        algorithm="HS256",
    )
    unsigned = jwt.encode(
        {"sub": str(owner.id), "ver": 1, "exp": now + timedelta(hours=1)},
        None,
        algorithm="none",
    )
    expired_token = create_access_token(
        owner.id, 1, settings, now=now - timedelta(days=2)
    ).token
    revoked_token = create_access_token(owner.id, 0, settings).token
    unknown_user_token = create_access_token(uuid.uuid4(), 0, settings).token

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    return {
        "none": {},
        "empty bearer": {"Authorization": "Bearer "},
        "garbage bearer": bearer("not-a-jwt"),
        "basic scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
        "forged token": bearer(forged),
        "unsigned token": bearer(unsigned),
        "expired token": bearer(expired_token),
        "revoked token": bearer(revoked_token),
        "unknown user token": bearer(unknown_user_token),
        "device key as bearer": bearer(device["api_key"]),
        "forged api key": {"X-API-Key": "mak_" + "Z" * 43},
        "garbage api key": {"X-API-Key": "' OR 1=1 --"},
        "revoked api key": {"X-API-Key": revoked["api_key"]},
        "expired api key": {"X-API-Key": expired["api_key"]},
        "device key as api key": {"X-API-Key": device["api_key"]},
        "device key in both": {
            **bearer(device["api_key"]),
            "X-API-Key": device["api_key"],
        },
    }


def test_every_route_is_authenticated_or_public(app: FastAPI) -> None:
    public = {
        (method, path)
        for method, path, route in api_routes(app)
        if not requires_credentials(route)
    }

    assert public == PUBLIC_ROUTES


async def test_bad_credentials_get_401_everywhere(
    app: FastAPI,
    client: AsyncClient,
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    make_user: MakeUser,
) -> None:
    owner = await make_user(plan="pro")
    credentials = await _bad_credentials(client, settings, session_factory, owner)
    tables_before = await snapshot_tables(session_factory)
    redis_keys_before = sorted(await redis.keys(f"{settings.REDIS_KEY_PREFIX}:*"))
    protected = [
        (method, path)
        for method, path, route in api_routes(app)
        if requires_credentials(route)
    ]

    failures = []
    for method, path in protected:
        url = PATH_PARAMETER.sub(lambda _: str(uuid.uuid4()), path)
        body = {} if method in ("POST", "PUT", "PATCH") else None
        for name, headers in credentials.items():
            response = await client.request(method, url, json=body, headers=headers)
            payload = response.json()
            if response.status_code != 401 or payload.get("success") is not False:
                failures.append(f"{method} {path} with {name}: {response.status_code}")

    assert failures == []
    assert len(protected) > 20
    assert await snapshot_tables(session_factory) == tables_before
    assert sorted(await redis.keys(f"{settings.REDIS_KEY_PREFIX}:*")) == (
        redis_keys_before
    )


async def test_401_bodies_name_the_problem(
    client: AsyncClient,
    settings: Settings,
    session_factory: Sessions,
    make_user: MakeUser,
) -> None:
    owner = await make_user()
    credentials = await _bad_credentials(client, settings, session_factory, owner)
    expected = {
        "none": "not_authenticated",
        "garbage bearer": "invalid_token",
        "forged token": "invalid_token",
        "unsigned token": "invalid_token",
        "expired token": "invalid_token",
        "revoked token": "invalid_token",
        "device key as bearer": "device_key_not_allowed",
        "forged api key": "invalid_api_key",
        "revoked api key": "invalid_api_key",
        "expired api key": "invalid_api_key",
        "device key as api key": "device_key_not_allowed",
    }

    for name, code in expected.items():
        response = await client.get("/api/v1/users/me", headers=credentials[name])
        assert response.status_code == 401, name
        assert response.json()["error"] == code, name
        assert response.json()["message"], name
        assert "WWW-Authenticate" in response.headers, name


async def test_user_api_key_as_bearer(client: AsyncClient, user: ApiUser) -> None:
    key = await create_api_key(client, user, name="server")
    headers = {"Authorization": f"Bearer {key['api_key']}"}

    spanish = await client.get("/api/v1/users/me", headers=headers)
    english = await client.get(
        "/api/v1/users/me", headers={**headers, "Accept-Language": "en"}
    )

    assert spanish.status_code == 401
    assert spanish.json()["error"] == "invalid_token"
    assert spanish.json()["reason"] == "user_api_key"
    assert spanish.json()["message"] == (
        "Esto es una API key de usuario, no un token de acceso: envíala en la "
        "cabecera 'X-API-Key', no en 'Authorization: Bearer'."
    )
    assert english.json()["message"] == (
        "This is a user API key, not an access token: send it in the 'X-API-Key' "
        "header, not in 'Authorization: Bearer'."
    )
