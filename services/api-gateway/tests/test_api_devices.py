import asyncio
import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from api_test_helpers import (
    ApiUser,
    MakeUser,
    count_rows,
    register_device,
    walk_pages,
)
from httpx import ASGITransport, AsyncClient
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.main import create_app
from mensajero_common import apikeys
from mensajero_common.keys import RedisKeys
from mensajero_common.models import DeviceStatus, SMSDevice, UserQuota
from mensajero_common.settings import Settings

DEVICES_URL = "/api/v1/sms/devices"


async def _device_row(
    session_factory: async_sessionmaker[AsyncSession], device_id: str
) -> SMSDevice | None:
    async with session_factory() as session:
        return await session.get(SMSDevice, uuid.UUID(device_id))


async def _devices_registered(
    session_factory: async_sessionmaker[AsyncSession], user: ApiUser
) -> int:
    async with session_factory() as session:
        quota = await session.scalar(
            select(UserQuota.devices_registered).where(UserQuota.user_id == user.id)
        )
    assert quota is not None
    return quota


async def test_register_device_returns_key_once(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    response = await client.post(
        DEVICES_URL,
        json={"name": " Pixel 7 ", "phone_number": "+52 55 1234 5678"},
        headers=user.headers,
    )

    assert response.status_code == 201, response.text
    body = response.json()
    data = body["data"]
    assert body["success"] is True
    assert body["message"].startswith("Dispositivo registrado")
    assert data["status"] == "registered"
    assert data["name"] == "Pixel 7"
    assert data["phone_number"] == "+525512345678"
    assert data["device_id"] == data["id"]
    assert data["api_key"].startswith("mdk_")
    assert data["api_key_prefix"] == data["api_key"][:12]

    row = await _device_row(session_factory, data["device_id"])
    assert row is not None
    assert row.api_key_hash == apikeys.hash_api_key(data["api_key"])
    assert data["api_key"] not in (row.api_key_hash, row.api_key_prefix)
    assert await _devices_registered(session_factory, user) == 1

    listed = await client.get(DEVICES_URL, headers=user.headers)
    fetched = await client.get(
        f"{DEVICES_URL}/{data['device_id']}", headers=user.headers
    )
    assert [item["id"] for item in listed.json()["data"]["items"]] == [data["id"]]
    assert "api_key" not in listed.json()["data"]["items"][0]
    assert fetched.status_code == 200
    assert "api_key" not in fetched.json()["data"]


async def test_register_device_national_number(
    client: AsyncClient, make_user: MakeUser
) -> None:
    mexican = await make_user(default_region="MX")
    no_region = await make_user()

    accepted = await client.post(
        DEVICES_URL,
        json={"name": "A", "phone_number": "55 1234 5678"},
        headers=mexican.headers,
    )
    rejected = await client.post(
        DEVICES_URL,
        json={"name": "B", "phone_number": "55 1234 5678"},
        headers=no_region.headers,
    )

    assert accepted.status_code == 201
    assert accepted.json()["data"]["phone_number"] == "+525512345678"
    assert rejected.status_code == 400
    assert rejected.json()["error"] == "invalid_phone_number"
    assert rejected.json()["reason"] == "missing_country_code"


async def test_device_number_with_extension(client: AsyncClient, user: ApiUser) -> None:
    created = await client.post(
        DEVICES_URL,
        json={"name": "A", "phone_number": "+34 612 345 678 ext. 12"},
        headers=user.headers,
    )
    device = await register_device(client, user, phone_number="+34612345678")
    updated = await client.put(
        f"{DEVICES_URL}/{device['device_id']}",
        json={"phone_number": "+34612345678;ext=1"},
        headers=user.headers,
    )

    assert created.status_code == 400
    assert created.json()["reason"] == "has_extension"
    assert updated.status_code == 400
    assert updated.json()["reason"] == "has_extension"


async def test_register_device_invalid_input(
    client: AsyncClient, user: ApiUser
) -> None:
    for payload in ({}, {"name": "   "}, {"name": "x" * 256}, {"name": "a\u0000b"}):
        response = await client.post(DEVICES_URL, json=payload, headers=user.headers)
        assert response.status_code == 422, payload
        assert response.json()["error"] == "validation_error"
        assert response.json()["details"][0]["field"] == "name"


BLANK_NAME_MESSAGES = {
    "es": "Debe contener al menos un carácter visible; no bastan espacios ni "
    "caracteres invisibles como \\u200b.",
    "en": "Must contain at least one visible character; spaces and invisible "
    "characters such as \\u200b are not enough.",
}
CONTROL_NAME_MESSAGES = {
    "es": "No puede contener caracteres de control (\\u0000 a \\u001f, \\u007f a "
    "\\u009f), separadores de línea o de párrafo (\\u2028, \\u2029) ni controles "
    "de dirección del texto (\\u061c, \\u200e, \\u200f, \\u202a a \\u202e, "
    "\\u2066 a \\u2069).",
    "en": "Must not contain control characters (\\u0000 to \\u001f, \\u007f to "
    "\\u009f), line or paragraph separators (\\u2028, \\u2029) or text direction "
    "controls (\\u061c, \\u200e, \\u200f, \\u202a to \\u202e, \\u2066 to "
    "\\u2069).",
}


@pytest.mark.parametrize(
    ("name", "error_type"),
    [
        ("\u200b", "string_blank"),
        (" \u2060\ufeff ", "string_blank"),
        ("\u2800", "string_blank"),
        ("\x01", "string_blank"),
        ("Pixel\x07", "string_contains_control"),
        ("Pixel\u202e7", "string_contains_control"),
        ("Pi\u2066xel\u2069", "string_contains_control"),
        ("Pixel\x9b", "string_contains_control"),
        ("Pixel\u20287", "string_contains_control"),
        ("Pi\u2029xel", "string_contains_control"),
        ("\u200fPixel", "string_contains_control"),
        ("Pixel\u200e7", "string_contains_control"),
        ("Pixel\u061c", "string_contains_control"),
    ],
)
async def test_device_name_rejects_invisible_or_control(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
    name: str,
    error_type: str,
) -> None:
    device = await register_device(client, user)
    url = f"{DEVICES_URL}/{device['device_id']}"
    messages = (
        BLANK_NAME_MESSAGES if error_type == "string_blank" else CONTROL_NAME_MESSAGES
    )

    for language, message in messages.items():
        headers = {**user.headers, "Accept-Language": language}
        created = await client.post(DEVICES_URL, json={"name": name}, headers=headers)
        updated = await client.put(url, json={"name": name}, headers=headers)

        for response in (created, updated):
            assert response.status_code == 422, response.text
            assert response.json()["error"] == "validation_error"
            assert response.json()["details"] == [
                {
                    "field": "name",
                    "location": "body",
                    "message": message,
                    "type": error_type,
                }
            ]
    row = await _device_row(session_factory, device["device_id"])
    assert row is not None
    assert row.name == device["name"]


async def test_update_device(
    client: AsyncClient, user: ApiUser, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await register_device(client, user, phone_number="+34612345678")
    url = f"{DEVICES_URL}/{device['device_id']}"

    renamed = await client.put(url, json={"name": "Office"}, headers=user.headers)
    cleared = await client.put(url, json={"phone_number": None}, headers=user.headers)
    null_name = await client.put(url, json={"name": None}, headers=user.headers)

    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["data"]["name"] == "Office"
    assert renamed.json()["data"]["phone_number"] == "+34612345678"
    assert cleared.json()["data"]["phone_number"] is None
    assert cleared.json()["data"]["name"] == "Office"
    assert null_name.status_code == 422

    pubsub = redis.pubsub()
    await pubsub.subscribe(redis_keys.device_channel(device["device_id"]))
    disabled = await client.put(url, json={"is_active": False}, headers=user.headers)
    assert disabled.json()["data"]["is_active"] is False
    assert await _next_control_message(pubsub) == b"disable"
    await pubsub.aclose()


async def _next_control_message(pubsub: object) -> bytes | None:
    for _ in range(50):
        message = await pubsub.get_message(  # type: ignore[attr-defined]
            ignore_subscribe_messages=True, timeout=0.1
        )
        if message is not None:
            data: bytes = message["data"]
            return data
    return None


async def test_rotate_key(
    client: AsyncClient,
    user: ApiUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    device = await register_device(client, user)
    pubsub = redis.pubsub()
    await pubsub.subscribe(redis_keys.device_channel(device["device_id"]))

    response = await client.post(
        f"{DEVICES_URL}/{device['device_id']}/rotate-key", headers=user.headers
    )

    assert response.status_code == 200, response.text
    new_key = response.json()["data"]["api_key"]
    assert new_key != device["api_key"]
    assert response.json()["data"]["device_id"] == device["device_id"]
    row = await _device_row(session_factory, device["device_id"])
    assert row is not None
    assert row.api_key_hash == apikeys.hash_api_key(new_key)
    assert await _next_control_message(pubsub) == b"revoke"
    await pubsub.aclose()


@pytest.mark.parametrize("change", ["rotate", "disable"])
async def test_closing_change_reports_device_offline(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
    change: str,
) -> None:
    # Rotating the key or disabling the device closes the live connection, so the
    # response must not show "online".
    device = await register_device(client, user)
    async with session_factory() as session:
        row = await session.get(SMSDevice, uuid.UUID(device["device_id"]))
        assert row is not None
        row.status = DeviceStatus.ONLINE
        await session.commit()

    url = f"{DEVICES_URL}/{device['device_id']}"
    if change == "rotate":
        response = await client.post(f"{url}/rotate-key", headers=user.headers)
    else:
        response = await client.put(
            url, json={"is_active": False}, headers=user.headers
        )
    stored = await _device_row(session_factory, device["device_id"])

    assert response.status_code == 200, response.text
    assert response.json()["data"]["status"] == "offline"
    assert stored is not None
    assert stored.status == DeviceStatus.OFFLINE


async def test_delete_device_outlasts_command_timeout(
    settings: Settings, make_user: MakeUser, pg_connection: asyncpg.Connection
) -> None:
    # The delete sets NULL on the device's messages. A message locked by another
    # transaction makes it wait, as a long history does, past the command timeout.
    app = create_app(settings.model_copy(update={"DATABASE_COMMAND_TIMEOUT_S": 1.0}))
    owner = await make_user(plan="free")
    async with (
        app.router.lifespan_context(app),
        AsyncClient(transport=ASGITransport(app=app), base_url="http://test") as client,
    ):
        device = await register_device(client, owner)
        message_id = uuid.uuid4()
        await pg_connection.execute(
            "INSERT INTO smsmessage (id, user_id, device_id, type, status, to_number,"
            " body) VALUES ($1, $2, $3, 'outgoing', 'delivered', '+34600000000', '')",
            message_id,
            owner.id,
            uuid.UUID(device["device_id"]),
        )
        locker = pg_connection.transaction()
        await locker.start()
        await pg_connection.execute(
            "SELECT 1 FROM smsmessage WHERE id = $1 FOR UPDATE", message_id
        )
        release = asyncio.get_running_loop().call_later(
            2.5, lambda: asyncio.ensure_future(locker.rollback())
        )
        try:
            deleted = await client.delete(
                f"{DEVICES_URL}/{device['device_id']}", headers=owner.headers
            )
        finally:
            release.cancel()
            if pg_connection.is_in_transaction():
                await locker.rollback()
        device_id = await pg_connection.fetchval(
            "SELECT device_id FROM smsmessage WHERE id = $1", message_id
        )

    assert deleted.status_code == 200, deleted.text
    assert device_id is None


async def test_delete_device_frees_slot(
    client: AsyncClient,
    make_user: MakeUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="free")
    device = await register_device(client, owner)
    pubsub = redis.pubsub()
    await pubsub.subscribe(redis_keys.device_channel(device["device_id"]))

    deleted = await client.delete(
        f"{DEVICES_URL}/{device['device_id']}",
        headers={**owner.headers, "Accept-Language": "en"},
    )

    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["data"] == {"device_id": device["device_id"], "deleted": True}
    assert deleted.json()["message"] == "Device deleted; its API key no longer works."
    assert await _next_control_message(pubsub) == b"revoke"
    await pubsub.aclose()
    assert await _device_row(session_factory, device["device_id"]) is None
    assert await _devices_registered(session_factory, owner) == 0

    again = await client.get(
        f"{DEVICES_URL}/{device['device_id']}", headers=owner.headers
    )
    assert again.status_code == 404
    await register_device(client, owner, name="Replacement")


async def test_device_limit_on_free_plan(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user(plan="free")
    await register_device(client, owner)

    response = await client.post(
        DEVICES_URL, json={"name": "Second"}, headers=owner.headers
    )

    assert response.status_code == 429
    assert response.json() == {
        "success": False,
        "error": "quota_exceeded",
        "message": "Tu plan permite 1 dispositivo y ya lo tienes registrado. "
        "Elimínalo si ya no lo usas (DELETE /api/v1/sms/devices/<id>) o pide al "
        "administrador de este servidor Mensajero un plan con más dispositivos (los "
        "planes están en /api/v1/sms/plans).",
        "quota_type": "devices",
        "limit": 1,
        "used": 1,
        "available": 0,
        "reset_date": None,
        "reset_at": None,
        "upgrade_url": "/api/v1/sms/plans",
    }
    # Waiting frees no device slot, so no Retry-After.
    assert "retry-after" not in response.headers


async def test_parallel_registrations_take_one_slot(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="free")

    responses = await asyncio.gather(
        *(
            client.post(DEVICES_URL, json={"name": f"Phone {n}"}, headers=owner.headers)
            for n in range(10)
        )
    )

    codes = sorted(response.status_code for response in responses)
    assert codes == [201] + [429] * 9
    assert await count_rows(session_factory, SMSDevice, user_id=owner.id) == 1
    assert await _devices_registered(session_factory, owner) == 1


async def test_other_users_device_is_not_found(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="pro")
    stranger = await make_user(plan="pro")
    device = await register_device(client, owner)
    url = f"{DEVICES_URL}/{device['device_id']}"

    responses = [
        await client.get(url, headers=stranger.headers),
        await client.put(url, json={"name": "Mine now"}, headers=stranger.headers),
        await client.post(f"{url}/rotate-key", headers=stranger.headers),
        await client.delete(url, headers=stranger.headers),
    ]

    for response in responses:
        assert response.status_code == 404, response.request.method
        assert response.json()["error"] == "device_not_found"
        assert response.json()["device_id"] == device["device_id"]
    row = await _device_row(session_factory, device["device_id"])
    assert row is not None
    assert row.name == "Pixel"
    assert row.api_key_hash == apikeys.hash_api_key(device["api_key"])
    listed = await client.get(DEVICES_URL, headers=stranger.headers)
    assert listed.json()["data"]["items"] == []


async def test_device_id_any_case(client: AsyncClient, user: ApiUser) -> None:
    device = await register_device(client, user)

    response = await client.get(
        f"{DEVICES_URL}/{device['device_id'].upper()}", headers=user.headers
    )

    assert response.status_code == 200
    assert response.json()["data"]["id"] == device["device_id"]


async def test_devices_require_token(client: AsyncClient) -> None:
    response = await client.get(DEVICES_URL)

    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"


async def _insert_devices(
    session_factory: async_sessionmaker[AsyncSession],
    owner: ApiUser,
    rows: list[dict[str, Any]],
) -> list[SMSDevice]:
    """Insert one device of `owner` per dict of column values, skipping the API."""
    devices = [
        SMSDevice(
            user_id=owner.id,
            name=f"seeded {index}",
            api_key_hash=uuid.uuid4().hex * 2,
            api_key_prefix="mdk_seeded",
            **values,
        )
        for index, values in enumerate(rows)
    ]
    async with session_factory() as session:
        session.add_all(devices)
        await session.commit()
    return devices


def _in_key_order(devices: list[SMSDevice], *, descending: bool) -> list[str]:
    ordered = sorted(devices, key=lambda d: (d.created_at, d.id), reverse=descending)
    return [str(device.id) for device in ordered]


async def test_device_listing_pages_both_orders(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="enterprise")
    stranger = await make_user(plan="enterprise")
    base = datetime.now(UTC) - timedelta(hours=1)
    # Three devices share one created_at, so the id must order them within a page walk.
    offsets = [0, 1, 1, 1, 2, 3, 4]
    owned = await _insert_devices(
        session_factory,
        owner,
        [{"created_at": base + timedelta(seconds=offset)} for offset in offsets],
    )
    foreign = await _insert_devices(
        session_factory, stranger, [{"created_at": base} for _ in range(3)]
    )

    for order in ("desc", "asc"):
        pages, limits = await walk_pages(
            client, owner, DEVICES_URL, {"limit": 3, "order": order}
        )

        listed = [device_id for page in pages for device_id in page]
        assert [len(page) for page in pages] == [3, 3, 1], order
        assert listed == _in_key_order(owned, descending=order == "desc")
        assert limits == [3, 3, 3]
        assert not {str(device.id) for device in foreign} & set(listed)

    default = await client.get(DEVICES_URL, headers=owner.headers)
    exact = await client.get(DEVICES_URL, params={"limit": 7}, headers=owner.headers)
    assert default.json()["data"]["limit"] == 50
    assert [item["id"] for item in default.json()["data"]["items"]] == _in_key_order(
        owned, descending=True
    )
    # A page that contains the last row ends the walk even when it is full.
    assert exact.json()["data"]["next_cursor"] is None


async def test_device_listing_filters(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="enterprise")
    stranger = await make_user(plan="enterprise")
    online, offline, disabled, registered = await _insert_devices(
        session_factory,
        owner,
        [
            {"status": DeviceStatus.ONLINE},
            {"status": DeviceStatus.OFFLINE},
            {"status": DeviceStatus.OFFLINE, "is_active": False},
            {"status": DeviceStatus.REGISTERED},
        ],
    )
    await _insert_devices(
        session_factory,
        stranger,
        [{"status": DeviceStatus.ONLINE}, {"status": DeviceStatus.OFFLINE}],
    )

    async def listed(params: Any) -> set[str]:
        response = await client.get(DEVICES_URL, params=params, headers=owner.headers)
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()["data"]["items"]}

    assert await listed({"status": "online"}) == {str(online.id)}
    assert await listed([("status", "online"), ("status", "offline")]) == {
        str(online.id),
        str(offline.id),
        str(disabled.id),
    }
    assert await listed({"is_active": "false"}) == {str(disabled.id)}
    assert await listed({"is_active": "true", "status": "offline"}) == {str(offline.id)}
    assert await listed({"status": "registered"}) == {str(registered.id)}


async def test_device_listing_rejects_bad_parameters(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="enterprise")
    await _insert_devices(session_factory, owner, [{} for _ in range(3)])
    first = await client.get(DEVICES_URL, params={"limit": 1}, headers=owner.headers)
    desc_cursor = first.json()["data"]["next_cursor"]
    assert desc_cursor is not None

    for params in (
        {"cursor": "garbage!"},
        {"cursor": "eyJ0IjoxfQ"},
        {"cursor": desc_cursor, "order": "asc"},
    ):
        response = await client.get(DEVICES_URL, params=params, headers=owner.headers)
        assert response.status_code == 400, params
        assert response.json()["error"] == "invalid_cursor"

    for params, field, error_type in (
        ({"limit": 0}, "limit", "greater_than_equal"),
        ({"limit": 101}, "limit", "less_than_equal"),
        ({"order": "newest"}, "order", "literal_error"),
        ({"status": "lost"}, "status.0", "enum"),
        ({"is_active": "maybe"}, "is_active", "bool_parsing"),
        ({"stauts": "online"}, "stauts", "extra_forbidden"),
    ):
        response = await client.get(
            DEVICES_URL,
            params=params,
            headers={**owner.headers, "Accept-Language": "es"},
        )
        assert response.status_code == 422, params
        body = response.json()
        assert body["error"] == "validation_error"
        assert [(item["field"], item["type"]) for item in body["details"]] == [
            (field, error_type)
        ]

    largest = await client.get(
        DEVICES_URL, params={"limit": 100}, headers=owner.headers
    )
    assert largest.status_code == 200
    assert largest.json()["data"]["limit"] == 100


async def test_device_listing_rejects_repeated_filters(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="enterprise")
    online, offline = await _insert_devices(
        session_factory,
        owner,
        [{"status": DeviceStatus.ONLINE}, {"status": DeviceStatus.OFFLINE}],
    )

    for name, values in (
        ("is_active", ("true", "false")),
        ("order", ("desc", "asc")),
        ("limit", ("1", "50")),
        ("cursor", ("first", "second")),
    ):
        response = await client.get(
            DEVICES_URL,
            params=[(name, value) for value in values],
            headers={**owner.headers, "Accept-Language": "es"},
        )
        assert response.status_code == 422, name
        body = response.json()
        assert body["error"] == "validation_error"
        assert [
            (item["field"], item["location"], item["type"]) for item in body["details"]
        ] == [(name, "query", "query_parameter_repeated")], name
        assert body["details"][0]["message"].startswith(
            "Este parámetro de consulta admite un solo valor"
        )

    statuses = await client.get(
        DEVICES_URL,
        params=[("status", "online"), ("status", "offline")],
        headers=owner.headers,
    )
    assert statuses.status_code == 200, statuses.text
    assert {item["id"] for item in statuses.json()["data"]["items"]} == {
        str(online.id),
        str(offline.id),
    }


def _without_listing(cursor: str) -> str:
    """Return `cursor` as the API wrote it before cursors named their listing."""
    payload = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    del payload["l"]
    raw = base64.urlsafe_b64encode(json.dumps(payload).encode())
    return raw.rstrip(b"=").decode()


async def test_device_listing_accepts_cursor_without_listing(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="enterprise")
    stranger = await make_user(plan="enterprise")
    base = datetime.now(UTC) - timedelta(hours=1)
    owned = await _insert_devices(
        session_factory,
        owner,
        [{"created_at": base + timedelta(seconds=n)} for n in range(3)],
    )
    await _insert_devices(session_factory, stranger, [{}, {}])
    first = await client.get(DEVICES_URL, params={"limit": 1}, headers=owner.headers)
    old_cursor = _without_listing(first.json()["data"]["next_cursor"])
    foreign = await client.get(
        DEVICES_URL, params={"limit": 1}, headers=stranger.headers
    )
    foreign_old_cursor = _without_listing(foreign.json()["data"]["next_cursor"])

    page = await client.get(
        DEVICES_URL, params={"cursor": old_cursor}, headers=owner.headers
    )
    elsewhere = [
        await client.get(url, params={"cursor": old_cursor}, headers=owner.headers)
        for url in ("/api/v1/sms/webhooks", "/api/v1/sms/messages")
    ]
    from_stranger = await client.get(
        DEVICES_URL, params={"cursor": foreign_old_cursor}, headers=owner.headers
    )

    assert page.status_code == 200, page.text
    assert [item["id"] for item in page.json()["data"]["items"]] == (
        _in_key_order(owned, descending=True)[1:]
    )
    for response in elsewhere:
        assert response.status_code == 400, response.url
        assert response.json()["error"] == "invalid_cursor"
    assert from_stranger.status_code == 400
    assert from_stranger.json()["error"] == "invalid_cursor"


async def test_device_listing_with_foreign_cursor(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="enterprise")
    stranger = await make_user(plan="enterprise")
    base = datetime.now(UTC) - timedelta(hours=1)
    owned = await _insert_devices(
        session_factory,
        owner,
        [{"created_at": base + timedelta(seconds=n)} for n in (0, 2, 4)],
    )
    await _insert_devices(
        session_factory,
        stranger,
        [{"created_at": base + timedelta(seconds=n)} for n in (1, 3, 5)],
    )
    stranger_page = await client.get(
        DEVICES_URL, params={"limit": 1}, headers=stranger.headers
    )
    foreign_cursor = stranger_page.json()["data"]["next_cursor"]

    response = await client.get(
        DEVICES_URL, params={"cursor": foreign_cursor}, headers=owner.headers
    )

    # The stranger's cursor points at second 5, so it positions the walk before the
    # owner's devices of seconds 4, 2 and 0, and shows none of the stranger's.
    assert response.status_code == 200, response.text
    assert [item["id"] for item in response.json()["data"]["items"]] == (
        _in_key_order(owned, descending=True)
    )
