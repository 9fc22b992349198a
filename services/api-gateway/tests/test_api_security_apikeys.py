"""User API keys: creation, use as X-API-Key, revocation, expiry, and device keys refused."""

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from api_test_helpers import ApiUser, MakeUser, register_device
from httpx import AsyncClient
from security_helpers import API_KEYS_PATH, create_api_key, key_headers
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.apikeys.service import MAX_ACTIVE_KEYS_PER_USER
from mensajero_common.models import SMSMessage, User, UserApiKey
from mensajero_common.settings import Settings
from mensajero_common.validation_messages import VALIDATION_MESSAGES

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # These tests make many requests per second on purpose.
    return settings.model_copy(update={"RATE_LIMIT_ENABLED": False})


async def load_key(sessions: Sessions, key_id: str) -> UserApiKey:
    async with sessions() as session:
        row = await session.get(UserApiKey, uuid.UUID(key_id))
        assert row is not None
        return row


async def test_create_key_shows_value_once(
    client: AsyncClient, user: ApiUser, session_factory: Sessions
) -> None:
    created = await create_api_key(client, user, name="billing server")
    listing = await client.get(API_KEYS_PATH, headers=user.headers)
    row = await load_key(session_factory, created["id"])

    value = created["api_key"]
    assert value.startswith("mak_")
    assert len(value) >= 40
    assert created["key_prefix"] == value[:12]
    assert created["name"] == "billing server"
    assert created["status"] == "active"
    assert created["expires_at"] is None
    assert row.key_hash == hashlib.sha256(value.encode()).hexdigest()
    assert value not in listing.text
    assert [item["id"] for item in listing.json()["data"]["items"]] == [created["id"]]
    assert "api_key" not in listing.json()["data"]["items"][0]


async def test_key_opens_rest_endpoints(
    client: AsyncClient, user: ApiUser, session_factory: Sessions
) -> None:
    value = (await create_api_key(client, user))["api_key"]

    me = await client.get("/api/v1/users/me", headers=key_headers(value))
    sent = await client.post(
        "/api/v1/sms/send",
        json={"to": "+525512345678", "body": "Hola"},
        headers=key_headers(value),
    )
    device = await client.post(
        "/api/v1/sms/devices", json={"name": "Pixel"}, headers=key_headers(value)
    )

    assert me.status_code == 200
    assert me.json()["data"]["id"] == str(user.id)
    assert sent.status_code == 201, sent.text
    assert device.status_code == 201, device.text
    async with session_factory() as session:
        message = await session.get(
            SMSMessage, uuid.UUID(sent.json()["data"]["message_id"])
        )
    assert message is not None
    assert message.user_id == user.id


async def test_key_records_last_use(
    client: AsyncClient, user: ApiUser, session_factory: Sessions
) -> None:
    created = await create_api_key(client, user)

    await client.get("/api/v1/users/me", headers=key_headers(created["api_key"]))
    row = await load_key(session_factory, created["id"])

    assert created["last_used_at"] is None
    assert row.last_used_at is not None
    assert datetime.now(UTC) - row.last_used_at < timedelta(minutes=1)


async def test_revoked_key_stops_at_once(client: AsyncClient, user: ApiUser) -> None:
    created = await create_api_key(client, user)
    headers = key_headers(created["api_key"])
    before = await client.get("/api/v1/users/me", headers=headers)

    revoked = await client.delete(f"{API_KEYS_PATH}/{created['id']}", headers=headers)
    after = await client.get("/api/v1/users/me", headers=headers)
    again = await client.delete(
        f"{API_KEYS_PATH}/{created['id']}", headers=user.headers
    )

    assert before.status_code == 200
    assert revoked.status_code == 200
    assert revoked.json()["data"]["status"] == "revoked"
    assert after.status_code == 401
    assert after.json()["error"] == "invalid_api_key"
    assert after.json()["reason"] == "revoked"
    assert again.status_code == 200
    assert again.json()["data"]["revoked_at"] == revoked.json()["data"]["revoked_at"]


async def test_expired_key_is_rejected(
    client: AsyncClient, user: ApiUser, session_factory: Sessions
) -> None:
    created = await create_api_key(client, user, expires_in_days=30)
    expires_at = datetime.fromisoformat(created["expires_at"])
    async with session_factory() as session:
        await session.execute(
            update(UserApiKey)
            .where(UserApiKey.id == uuid.UUID(created["id"]))
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        await session.commit()

    response = await client.get(
        "/api/v1/users/me", headers=key_headers(created["api_key"])
    )
    listing = await client.get(API_KEYS_PATH, headers=user.headers)

    assert timedelta(days=29) < expires_at - datetime.now(UTC) <= timedelta(days=30)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_api_key"
    assert response.json()["reason"] == "expired"
    assert listing.json()["data"]["items"][0]["status"] == "expired"


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "x" * 256},
        {"name": "ok", "expires_in_days": 0},
        {"name": "ok", "expires_in_days": 3651},
        {"name": "ok", "expires_in_days": "soon"},
        {"name": "nul\u0000"},
    ],
)
async def test_create_key_invalid_body(
    client: AsyncClient, user: ApiUser, body: dict[str, object]
) -> None:
    response = await client.post(API_KEYS_PATH, json=body, headers=user.headers)

    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"


@pytest.mark.parametrize("name", ["\u202eA", "key\n2", "\u0007bell", "\u2066x\u2069"])
async def test_create_key_rejects_control_characters(
    client: AsyncClient, user: ApiUser, name: str
) -> None:
    response = await client.post(
        API_KEYS_PATH, json={"name": name}, headers=user.headers
    )
    listing = await client.get(API_KEYS_PATH, headers=user.headers)

    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error"
    assert response.json()["details"] == [
        {
            "field": "name",
            "location": "body",
            "message": VALIDATION_MESSAGES["string_contains_control"]["es"],
            "type": "string_contains_control",
        }
    ]
    assert listing.json()["data"]["items"] == []


async def test_key_cannot_create_keys(client: AsyncClient, user: ApiUser) -> None:
    value = (await create_api_key(client, user))["api_key"]

    response = await client.post(
        API_KEYS_PATH, json={"name": "second"}, headers=key_headers(value)
    )
    listing = await client.get(API_KEYS_PATH, headers=user.headers)

    assert response.status_code == 403
    assert response.json()["error"] == "login_token_required"
    assert len(listing.json()["data"]["items"]) == 1


async def test_key_cannot_change_the_password(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    value = (await create_api_key(client, user))["api_key"]

    response = await client.put(
        "/api/v1/users/me/password",
        json={"current_password": user.password, "new_password": "otra-clave-larga-1"},
        headers=key_headers(value),
    )
    still_valid = await client.get("/api/v1/users/me", headers=user.headers)

    assert response.status_code == 403
    assert response.json()["error"] == "login_token_required"
    assert still_valid.status_code == 200
    async with session_factory() as session:
        stored = await session.get(User, user.id)
        assert stored is not None
        assert stored.token_version == 0


async def test_active_key_limit(client: AsyncClient, user: ApiUser) -> None:
    created = [
        await create_api_key(client, user, name=f"k{index}")
        for index in range(MAX_ACTIVE_KEYS_PER_USER)
    ]
    refused = await client.post(
        API_KEYS_PATH, json={"name": "one more"}, headers=user.headers
    )
    await client.delete(f"{API_KEYS_PATH}/{created[0]['id']}", headers=user.headers)
    accepted = await client.post(
        API_KEYS_PATH, json={"name": "after revoking"}, headers=user.headers
    )

    assert refused.status_code == 409
    assert refused.json()["error"] == "api_key_limit_reached"
    assert refused.json()["limit"] == MAX_ACTIVE_KEYS_PER_USER
    assert accepted.status_code == 201


async def test_token_and_key_of_two_users(
    client: AsyncClient, user: ApiUser, make_user: MakeUser
) -> None:
    other = await make_user()
    own_key = (await create_api_key(client, user))["api_key"]
    other_key = (await create_api_key(client, other))["api_key"]

    same = await client.get(
        "/api/v1/users/me", headers={**user.headers, **key_headers(own_key)}
    )
    mixed = await client.get(
        "/api/v1/users/me", headers={**user.headers, **key_headers(other_key)}
    )

    assert same.status_code == 200
    assert mixed.status_code == 401
    assert mixed.json()["error"] == "credentials_mismatch"


async def test_key_of_disabled_user(
    client: AsyncClient, user: ApiUser, session_factory: Sessions
) -> None:
    value = (await create_api_key(client, user))["api_key"]
    async with session_factory() as session:
        await session.execute(
            update(User).where(User.id == user.id).values(is_active=False)
        )
        await session.commit()

    response = await client.get("/api/v1/users/me", headers=key_headers(value))

    assert response.status_code == 403
    assert response.json()["error"] == "inactive_user"


async def test_keys_listed_for_owner_only(
    client: AsyncClient, user: ApiUser, make_user: MakeUser
) -> None:
    other = await make_user()
    await create_api_key(client, user, name="mine")
    await create_api_key(client, other, name="theirs")

    listing = await client.get(API_KEYS_PATH, headers=user.headers)

    assert [item["name"] for item in listing.json()["data"]["items"]] == ["mine"]


async def test_key_listing_pages(
    client: AsyncClient, user: ApiUser, session_factory: Sessions
) -> None:
    # Revoked keys stay listed, so without pages the listing would grow without bound.
    names = [f"key {index}" for index in range(5)]
    for name in names:
        await create_api_key(client, user, name=name)
    # Two keys with one created_at: the id orders them, and no page skips either.
    async with session_factory() as session:
        await session.execute(
            update(UserApiKey)
            .where(UserApiKey.name.in_(["key 1", "key 2"]))
            .values(created_at=datetime(2026, 1, 1, tzinfo=UTC))
        )
        await session.commit()

    pages = []
    limits = []
    cursor = None
    for _ in range(4):
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = await client.get(API_KEYS_PATH, params=params, headers=user.headers)
        assert response.status_code == 200, response.text
        pages.append([item["name"] for item in response.json()["data"]["items"]])
        limits.append(response.json()["data"]["limit"])
        cursor = response.json()["data"]["next_cursor"]
        if cursor is None:
            break
    tampered = await client.get(
        API_KEYS_PATH, params={"cursor": "bm90LWEtY3Vyc29y"}, headers=user.headers
    )
    too_large = await client.get(
        API_KEYS_PATH, params={"limit": 101}, headers=user.headers
    )
    unknown = await client.get(
        API_KEYS_PATH, params={"status": "active"}, headers=user.headers
    )
    # A full page that contains the last key is the last page.
    whole = await client.get(API_KEYS_PATH, params={"limit": 5}, headers=user.headers)

    listed = [name for page in pages for name in page]
    assert sorted(listed) == sorted(names)
    assert len(listed) == len(names)
    assert all(len(page) <= 2 for page in pages)
    assert limits == [2] * len(pages)
    assert cursor is None
    assert tampered.status_code == 400
    assert tampered.json()["error"] == "invalid_cursor"
    assert too_large.status_code == 422
    assert unknown.status_code == 422
    assert unknown.json()["details"][0]["type"] == "extra_forbidden"
    assert len(whole.json()["data"]["items"]) == 5
    assert whole.json()["data"]["limit"] == 5
    assert whole.json()["data"]["next_cursor"] is None


async def test_api_key_listing_rejects_repeated_parameters(
    client: AsyncClient, user: ApiUser
) -> None:
    for name, values in (("limit", ("1", "2")), ("cursor", ("first", "second"))):
        response = await client.get(
            API_KEYS_PATH,
            params=[(name, value) for value in values],
            headers=user.headers,
        )

        assert response.status_code == 422, name
        assert response.json()["error"] == "validation_error"
        assert [
            (item["field"], item["location"], item["type"])
            for item in response.json()["details"]
        ] == [(name, "query", "query_parameter_repeated")], name


@pytest.mark.parametrize("place", ["x-api-key", "bearer"])
async def test_device_key_cannot_read_rest_api(
    client: AsyncClient, user: ApiUser, place: str
) -> None:
    device = await register_device(client, user)
    device_key = device["api_key"]
    headers = (
        key_headers(device_key)
        if place == "x-api-key"
        else {"Authorization": f"Bearer {device_key}"}
    )

    responses = [
        await client.get("/api/v1/users/me", headers=headers),
        await client.get("/api/v1/sms/messages", headers=headers),
        await client.get(f"/api/v1/sms/devices/{device['device_id']}", headers=headers),
        await client.post(
            "/api/v1/sms/send",
            json={"to": "+525512345678", "body": "Hola"},
            headers=headers,
        ),
    ]

    for response in responses:
        assert response.status_code == 401, response.text
        assert response.json()["error"] == "device_key_not_allowed"


async def test_unknown_key_rejected(client: AsyncClient) -> None:
    responses = [
        await client.get("/api/v1/users/me", headers=key_headers("mak_" + "A" * 43)),
        await client.get("/api/v1/users/me", headers=key_headers("not-a-key")),
        await client.get("/api/v1/users/me", headers=key_headers("mak_" + "A" * 5000)),
    ]

    for response in responses:
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_api_key"
        assert response.json()["reason"] == "unknown"


async def test_parallel_requests_with_one_key(
    client: AsyncClient, user: ApiUser, session_factory: Sessions
) -> None:
    value = (await create_api_key(client, user))["api_key"]

    responses = await asyncio.gather(
        *(client.get("/api/v1/users/me", headers=key_headers(value)) for _ in range(10))
    )

    assert [response.status_code for response in responses] == [200] * 10
    async with session_factory() as session:
        rows = (await session.scalars(select(UserApiKey))).all()
    assert len(rows) == 1


async def test_parallel_creates_stop_at_active_key_limit(
    client: AsyncClient, user: ApiUser, session_factory: Sessions
) -> None:
    revoked_at = datetime.now(UTC)
    async with session_factory() as session:
        session.add_all(
            UserApiKey(
                user_id=user.id,
                name=f"old {index}",
                key_hash=hashlib.sha256(f"{user.id}:{index}".encode()).hexdigest(),
                key_prefix="msj_old",
                revoked_at=revoked_at if index < 3 else None,
            )
            for index in range(MAX_ACTIVE_KEYS_PER_USER)
        )
        await session.commit()

    responses = await asyncio.gather(
        *(
            client.post(API_KEYS_PATH, json={"name": f"p{index}"}, headers=user.headers)
            for index in range(10)
        )
    )

    codes = sorted(response.status_code for response in responses)
    assert codes == [201] * 3 + [409] * 7
    rejected = [response for response in responses if response.status_code == 409]
    assert {response.json()["error"] for response in rejected} == {
        "api_key_limit_reached"
    }
    async with session_factory() as session:
        active = await session.scalar(
            select(func.count()).where(
                UserApiKey.user_id == user.id, UserApiKey.revoked_at.is_(None)
            )
        )
    assert active == MAX_ACTIVE_KEYS_PER_USER
