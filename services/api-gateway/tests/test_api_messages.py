import asyncio
import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from api_test_helpers import ApiUser, MakeUser, count_rows, register_device, send_sms
from httpx import AsyncClient
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.quotas.service import next_quota_reset
from mensajero_common import queues
from mensajero_common.keys import RedisKeys
from mensajero_common.models import (
    MessageStatus,
    MessageType,
    SMSMessage,
    UserQuota,
)
from mensajero_common.settings import Settings

MESSAGES_URL = "/api/v1/sms/messages"
INCOMING_URL = "/api/v1/sms/incoming"


async def _sms_sent(
    session_factory: async_sessionmaker[AsyncSession], user: ApiUser
) -> int:
    async with session_factory() as session:
        used = await session.scalar(
            select(UserQuota.sms_sent_this_month).where(UserQuota.user_id == user.id)
        )
    assert used is not None
    return used


async def _set_sms_sent(
    session_factory: async_sessionmaker[AsyncSession], user: ApiUser, used: int
) -> None:
    async with session_factory() as session:
        await session.execute(
            update(UserQuota)
            .where(UserQuota.user_id == user.id)
            .values(sms_sent_this_month=used)
        )
        await session.commit()


async def _stream_message_ids(redis: Redis, redis_keys: RedisKeys) -> list[str]:
    entries = await redis.xrange(redis_keys.new_messages_stream)
    return [fields[b"message_id"].decode() for _, fields in entries]


async def _insert_message(
    session_factory: async_sessionmaker[AsyncSession], user: ApiUser, **fields: Any
) -> uuid.UUID:
    values: dict[str, Any] = {
        "user_id": user.id,
        "type": MessageType.OUTGOING,
        "status": MessageStatus.PENDING,
        "to_number": "+525512345678",
        "body": "seeded",
        **fields,
    }
    message = SMSMessage(**values)
    async with session_factory() as session:
        session.add(message)
        await session.commit()
    return message.id


async def test_send_happy_path(
    client: AsyncClient,
    user: ApiUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    response = await send_sms(client, user, to="+52 55 1234 5678", body="Hola mundo")

    assert response.status_code == 201, response.text
    body = response.json()
    data = body["data"]
    assert body["success"] is True
    assert body["message"] == "Mensaje en cola para envío."
    assert data["status"] == "pending"
    assert data["segments"] == 1
    assert data["encoding"] == "gsm7"
    assert data["to"] == "+525512345678"

    async with session_factory() as session:
        row = await session.get(SMSMessage, uuid.UUID(data["message_id"]))
    assert row is not None
    assert row.status == MessageStatus.PENDING
    assert row.type == MessageType.OUTGOING
    assert row.to_number == "+525512345678"
    assert row.body == "Hola mundo"
    assert row.device_id is None
    assert row.requested_device_id is None
    assert await _stream_message_ids(redis, redis_keys) == [data["message_id"]]
    assert await _sms_sent(session_factory, user) == 1


@pytest.mark.parametrize("idempotency_key", [None, "carried-1"])
async def test_send_entry_carries_stored_message(
    client: AsyncClient,
    user: ApiUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: async_sessionmaker[AsyncSession],
    idempotency_key: str | None,
) -> None:
    device = await register_device(client, user)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}

    response = await send_sms(
        client,
        user,
        body="Hola 👋",
        headers=headers,
        device_id=device["device_id"],
        ttl=600,
    )

    assert response.status_code == 201, response.text
    async with session_factory() as session:
        row = await session.get(
            SMSMessage, uuid.UUID(response.json()["data"]["message_id"])
        )
    assert row is not None
    ((_, fields),) = await redis.xrange(redis_keys.new_messages_stream)
    assert queues.read_new_message(fields) == queues.NewMessage(
        id=row.id,
        user_id=row.user_id,
        requested_device_id=row.requested_device_id,
        to_number="+525512345678",
        body="Hola 👋",
        segments=1,
        encoding="ucs2",
        created_at=row.created_at,
        expires_at=row.expires_at,
    )
    assert row.expires_at is not None


async def test_send_counts_segments(client: AsyncClient, user: ApiUser) -> None:
    long_gsm = await send_sms(client, user, body="a" * 161)
    emoji = await send_sms(client, user, body="Hola 👋")

    assert long_gsm.json()["data"]["segments"] == 2
    assert long_gsm.json()["data"]["encoding"] == "gsm7"
    assert emoji.json()["data"]["segments"] == 1
    assert emoji.json()["data"]["encoding"] == "ucs2"


async def test_send_with_own_device(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    device = await register_device(client, user)

    response = await send_sms(client, user, device_id=device["device_id"].upper())

    assert response.status_code == 201, response.text
    async with session_factory() as session:
        row = await session.get(
            SMSMessage, uuid.UUID(response.json()["data"]["message_id"])
        )
    assert row is not None
    assert str(row.device_id) == device["device_id"]
    assert str(row.requested_device_id) == device["device_id"]


async def test_send_malformed_numbers(
    client: AsyncClient,
    user: ApiUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    cases = {
        "hello": "missing_country_code",
        "+hello": "not_a_number",
        "+1": "not_a_number",
        "+999123456789": "invalid_country_code",
        "+52123": "too_short",
        "": "not_a_number",
        "   ": "not_a_number",
    }

    for number, reason in cases.items():
        response = await send_sms(client, user, to=number)
        assert response.status_code == 400, number
        body = response.json()
        assert body["error"] == "invalid_phone_number", number
        assert body["number"] == number
        assert body["reason"] == reason, number
        assert "E.164" in body["message"]
        # A blank number is named missing, not quoted as "the number  is invalid".
        assert ("Falta el número" in body["message"]) == (not number.strip()), number
        assert "  " not in body["message"], number

    assert await count_rows(session_factory, SMSMessage) == 0
    assert await _stream_message_ids(redis, redis_keys) == []
    assert await _sms_sent(session_factory, user) == 0


async def test_send_number_with_extension(
    client: AsyncClient,
    make_user: MakeUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    spanish = await make_user(default_region="ES")
    numbers = [
        "+34 612 345 678 ext. 12",
        "+34612345678;ext=1",
        "+34 612 345 678 x99",
        "612 345 678 ext 12",
    ]

    for number in numbers:
        response = await send_sms(client, spanish, to=number)
        assert response.status_code == 400, number
        body = response.json()
        assert body["error"] == "invalid_phone_number", number
        assert body["number"] == number
        assert body["reason"] == "has_extension", number
        assert "extensión" in body["message"]

    assert await count_rows(session_factory, SMSMessage) == 0
    assert await _stream_message_ids(redis, redis_keys) == []
    assert await _sms_sent(session_factory, spanish) == 0


async def test_send_national_number_uses_region(
    client: AsyncClient, make_user: MakeUser
) -> None:
    mexican = await make_user(default_region="MX")
    spanish = await make_user(default_region="ES")
    no_region = await make_user()

    from_mexico = await send_sms(client, mexican, to="55 1234 5678")
    from_spain = await send_sms(client, spanish, to="612 34 56 78")
    rejected = await send_sms(client, no_region, to="55 1234 5678")
    wrong_region = await send_sms(client, spanish, to="55 1234 5678")

    assert from_mexico.status_code == 201
    assert from_mexico.json()["data"]["to"] == "+525512345678"
    assert from_spain.json()["data"]["to"] == "+34612345678"
    assert rejected.status_code == 400
    assert rejected.json()["reason"] == "missing_country_code"
    assert wrong_region.status_code == 400
    assert wrong_region.json()["error"] == "invalid_phone_number"


async def test_send_empty_body(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    for text in ("", "   ", "\n\t"):
        response = await send_sms(client, user, body=text)
        assert response.status_code == 400, repr(text)
        assert response.json()["error"] == "empty_body"
    assert await count_rows(session_factory, SMSMessage) == 0
    assert await _sms_sent(session_factory, user) == 0


# Bodies that a phone would show as empty: zero-width and format characters, fillers
# and variation selectors alone or mixed with whitespace.
INVISIBLE_BODIES = [
    "\u200b",
    "\ufeff",
    "\u2060",
    "\u200b \u200d\n\u00a0",
    "\u3164",
    "\u2800",
    "\ufe0f\U000e0020",
]


async def test_send_invisible_body(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    for text in INVISIBLE_BODIES:
        response = await send_sms(client, user, body=text)
        assert response.status_code == 400, repr(text)
        assert response.json()["error"] == "empty_body", repr(text)
    assert await count_rows(session_factory, SMSMessage) == 0
    assert await _sms_sent(session_factory, user) == 0


async def test_send_text_with_joiners(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="pro")
    bodies = ["👩\u200d💻", "👍🏽", "Hola\u200bmundo", "\ufeffHola"]

    responses = [await send_sms(client, owner, body=text) for text in bodies]

    assert [response.status_code for response in responses] == [201] * len(bodies)
    async with session_factory() as session:
        stored = set(
            await session.scalars(
                select(SMSMessage.body).where(SMSMessage.user_id == owner.id)
            )
        )
    assert stored == set(bodies)


async def test_send_oversize_body(
    client: AsyncClient,
    user: ApiUser,
    settings: Settings,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    limit = settings.SMS_MAX_BODY_LENGTH

    at_limit = await send_sms(client, user, body="b" * limit)
    over = await send_sms(client, user, body="b" * (limit + 1))

    assert at_limit.status_code == 201
    assert over.status_code == 400
    assert over.json()["error"] == "body_too_long"
    assert over.json()["length"] == limit + 1
    assert over.json()["limit"] == limit
    assert await count_rows(session_factory, SMSMessage) == 1
    assert await _sms_sent(session_factory, user) == 1


async def test_send_body_with_nul(client: AsyncClient, user: ApiUser) -> None:
    response = await send_sms(client, user, body="a\u0000b")

    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "body"


async def test_send_from_other_users_device(
    client: AsyncClient,
    make_user: MakeUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="pro")
    stranger = await make_user(plan="pro")
    device = await register_device(client, owner)

    response = await send_sms(client, stranger, device_id=device["device_id"])
    unknown = await send_sms(client, stranger, device_id=str(uuid.uuid4()))

    assert response.status_code == 404
    assert response.json()["error"] == "device_not_found"
    assert response.json()["device_id"] == device["device_id"]
    assert unknown.status_code == 404
    assert await count_rows(session_factory, SMSMessage) == 0
    assert await _stream_message_ids(redis, redis_keys) == []
    assert await _sms_sent(session_factory, stranger) == 0


async def test_send_from_inactive_device(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    device = await register_device(client, user)
    await client.put(
        f"/api/v1/sms/devices/{device['device_id']}",
        json={"is_active": False},
        headers=user.headers,
    )

    response = await send_sms(client, user, device_id=device["device_id"])

    assert response.status_code == 409
    assert response.json()["error"] == "device_inactive"
    assert await count_rows(session_factory, SMSMessage) == 0


async def test_send_quota_exhausted(
    client: AsyncClient,
    make_user: MakeUser,
    settings: Settings,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="free")
    await _set_sms_sent(session_factory, owner, 50)

    response = await send_sms(client, owner)

    assert response.status_code == 429
    expected_reset = next_quota_reset(datetime.now(UTC), settings.QUOTA_RESET_DAY)
    assert response.json() == {
        "success": False,
        "error": "quota_exceeded",
        "message": "Tu plan permite 50 SMS al mes y ya los has enviado todos. Podrás "
        f"enviar más desde el {expected_reset.date().isoformat()} a las 00:00 UTC. "
        "Para enviar antes, pide al administrador de este servidor Mensajero un plan "
        "mayor (los planes están en /api/v1/sms/plans).",
        "quota_type": "sms_monthly",
        "limit": 50,
        "used": 50,
        "available": 0,
        "reset_date": expected_reset.date().isoformat(),
        "reset_at": expected_reset.isoformat().replace("+00:00", "Z"),
        "upgrade_url": "/api/v1/sms/plans",
    }
    assert int(response.headers["retry-after"]) > 0
    assert await count_rows(session_factory, SMSMessage) == 0
    assert await _sms_sent(session_factory, owner) == 50


async def test_parallel_sends_with_one_left(
    client: AsyncClient,
    make_user: MakeUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="free")
    await _set_sms_sent(session_factory, owner, 49)

    responses = await asyncio.gather(
        *(send_sms(client, owner, body=f"message {n}") for n in range(50))
    )

    codes = sorted(response.status_code for response in responses)
    assert codes == [201] + [429] * 49
    assert await count_rows(session_factory, SMSMessage) == 1
    assert await _sms_sent(session_factory, owner) == 50
    assert len(await _stream_message_ids(redis, redis_keys)) == 1


async def test_idempotent_repeat_returns_first(
    client: AsyncClient,
    user: ApiUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    key = {"Idempotency-Key": "order-1234"}

    first = await send_sms(client, user, body="Tu código es 1234", headers=key)
    repeat = await send_sms(client, user, body="Tu código es 1234", headers=key)

    assert first.status_code == 201
    assert repeat.status_code == 200
    assert repeat.headers["idempotent-replayed"] == "true"
    assert repeat.json()["data"] == first.json()["data"]
    assert await count_rows(session_factory, SMSMessage) == 1
    assert await _sms_sent(session_factory, user) == 1
    assert len(await _stream_message_ids(redis, redis_keys)) == 1


async def test_idempotency_key_with_other_request(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    key = {"Idempotency-Key": "order-5678"}
    await send_sms(client, user, body="first", headers=key)

    other_body = await send_sms(client, user, body="second", headers=key)
    other_number = await send_sms(
        client, user, to="+34612345678", body="first", headers=key
    )

    for response in (other_body, other_number):
        assert response.status_code == 409
        assert response.json()["error"] == "idempotency_key_reused"
    assert await count_rows(session_factory, SMSMessage) == 1
    assert await _sms_sent(session_factory, user) == 1


async def test_idempotency_key_per_user(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    first_user = await make_user()
    second_user = await make_user()
    key = {"Idempotency-Key": "shared-key"}

    first = await send_sms(client, first_user, headers=key)
    second = await send_sms(client, second_user, headers=key)

    assert first.status_code == 201
    assert second.status_code == 201
    assert first.json()["data"]["message_id"] != second.json()["data"]["message_id"]
    assert await count_rows(session_factory, SMSMessage) == 2


async def test_idempotent_concurrent_repeats(
    client: AsyncClient,
    make_user: MakeUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="free")
    # One SMS left: a repeat must replay the first message, not hit the spent quota.
    await _set_sms_sent(session_factory, owner, 49)
    key = {"Idempotency-Key": str(uuid.uuid4())}

    responses = await asyncio.gather(
        *(send_sms(client, owner, body="same", headers=key) for _ in range(10))
    )

    codes = sorted(response.status_code for response in responses)
    assert codes == [200] * 9 + [201]
    assert len({response.json()["data"]["message_id"] for response in responses}) == 1
    assert await count_rows(session_factory, SMSMessage) == 1
    assert await _sms_sent(session_factory, owner) == 50
    assert len(await _stream_message_ids(redis, redis_keys)) == 1


async def test_idempotent_concurrent_repeats_charge_once(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    # Plenty of quota left: each repeat's charge succeeds before its insert finds the
    # key taken, and must be undone.
    owner = await make_user(plan="free")
    key = {"Idempotency-Key": str(uuid.uuid4())}

    responses = await asyncio.gather(
        *(send_sms(client, owner, body="same", headers=key) for _ in range(10))
    )

    codes = sorted(response.status_code for response in responses)
    assert codes == [200] * 9 + [201]
    assert await count_rows(session_factory, SMSMessage) == 1
    assert await _sms_sent(session_factory, owner) == 1


async def test_idempotency_key_too_long(client: AsyncClient, user: ApiUser) -> None:
    response = await send_sms(client, user, headers={"Idempotency-Key": "k" * 256})

    assert response.status_code == 422
    assert response.json()["details"][0]["location"] == "header"


async def test_read_message(client: AsyncClient, user: ApiUser) -> None:
    sent = await send_sms(client, user, body="Hola")
    message_id = sent.json()["data"]["message_id"]

    lower = await client.get(f"{MESSAGES_URL}/{message_id}", headers=user.headers)
    upper = await client.get(
        f"{MESSAGES_URL}/{message_id.upper()}", headers=user.headers
    )

    assert lower.status_code == 200
    assert upper.json() == lower.json()
    data = lower.json()["data"]
    assert data["id"] == message_id
    assert data["type"] == "outgoing"
    assert data["status"] == "pending"
    assert data["to"] == "+525512345678"
    assert data["from"] is None
    assert data["body"] == "Hola"
    assert data["attempts"] == 0
    assert data["error"] is None
    for name in ("created_at", "assigned_at", "sent_at", "delivered_at", "failed_at"):
        assert name in data


async def test_other_users_message_is_not_found(
    client: AsyncClient,
    make_user: MakeUser,
) -> None:
    owner = await make_user()
    stranger = await make_user()
    sent = await send_sms(client, owner)
    message_id = sent.json()["data"]["message_id"]

    response = await client.get(
        f"{MESSAGES_URL}/{message_id}", headers=stranger.headers
    )
    listed = await client.get(MESSAGES_URL, headers=stranger.headers)

    assert response.status_code == 404
    assert response.json()["error"] == "message_not_found"
    assert response.json()["message_id"] == message_id
    assert listed.json()["data"]["items"] == []


async def _collect_ids(
    client: AsyncClient, user: ApiUser, url: str, params: dict[str, Any]
) -> list[str]:
    response = await client.get(url, params=params, headers=user.headers)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["data"]["items"]]


async def _ids_in_key_order(
    session_factory: async_sessionmaker[AsyncSession], *, descending: bool
) -> list[str]:
    async with session_factory() as session:
        rows = (
            await session.execute(select(SMSMessage.created_at, SMSMessage.id))
        ).all()
    ordered = sorted(rows, reverse=descending)
    return [str(row.id) for row in ordered]


async def test_pagination_with_inserts_between_pages(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    base = datetime.now(UTC) - timedelta(hours=1)
    # Three rows share one timestamp, as the rows of one transaction do.
    offsets = [0, 1, 1, 1, 2, 3, 4]
    seeded = [
        await _insert_message(
            session_factory, user, created_at=base + timedelta(seconds=offset)
        )
        for offset in offsets
    ]
    seeded_ids = {str(message_id) for message_id in seeded}

    for order in ("desc", "asc"):
        seen: list[str] = []
        inserted: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 3, "order": order}
            if cursor:
                params["cursor"] = cursor
            response = await client.get(
                MESSAGES_URL, params=params, headers=user.headers
            )
            page = response.json()["data"]
            seen.extend(item["id"] for item in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
            new_id = await _insert_message(session_factory, user, body="between pages")
            inserted.append(str(new_id))

        assert len(seen) == len(set(seen)), order
        assert seeded_ids <= set(seen), order
        expected = await _ids_in_key_order(session_factory, descending=order == "desc")
        assert seen == [message_id for message_id in expected if message_id in seen]
        if order == "asc":
            # Rows committed after the walk began come after every seeded row.
            assert set(inserted) <= set(seen)
        else:
            assert not set(inserted) & set(seen)


async def test_pagination_order_and_end(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    base = datetime.now(UTC) - timedelta(days=1)
    ids = [
        str(
            await _insert_message(
                session_factory, user, created_at=base + timedelta(minutes=n)
            )
        )
        for n in range(4)
    ]

    newest_first = await client.get(
        MESSAGES_URL, params={"limit": 4}, headers=user.headers
    )
    oldest_first = await client.get(
        MESSAGES_URL, params={"limit": 10, "order": "asc"}, headers=user.headers
    )

    assert [item["id"] for item in newest_first.json()["data"]["items"]] == ids[::-1]
    assert newest_first.json()["data"]["next_cursor"] is None
    assert [item["id"] for item in oldest_first.json()["data"]["items"]] == ids
    assert oldest_first.json()["data"]["limit"] == 10


async def test_pagination_invalid_cursor(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    for _ in range(3):
        await _insert_message(session_factory, user)
    first = await client.get(MESSAGES_URL, params={"limit": 1}, headers=user.headers)
    desc_cursor = first.json()["data"]["next_cursor"]

    for params in (
        {"cursor": "garbage!"},
        {"cursor": "eyJ0IjoxfQ"},
        {"cursor": desc_cursor, "order": "asc"},
    ):
        response = await client.get(MESSAGES_URL, params=params, headers=user.headers)
        assert response.status_code == 400, params
        assert response.json()["error"] == "invalid_cursor"

    for limit in (0, 101):
        response = await client.get(
            MESSAGES_URL, params={"limit": limit}, headers=user.headers
        )
        assert response.status_code == 422


async def test_list_rejects_repeated_filters(
    client: AsyncClient, user: ApiUser
) -> None:
    repeats = {
        "limit": ("1", "2"),
        "cursor": ("first", "second"),
        "order": ("asc", "desc"),
        "type": ("outgoing", "incoming"),
        "device_id": (str(uuid.uuid4()), str(uuid.uuid4())),
        "phone": ("+525512345678", "+34612345678"),
        "date_from": ("2026-01-01", "2026-02-01"),
        "date_to": ("2026-03-01", "2026-04-01"),
    }

    for url in (MESSAGES_URL, INCOMING_URL):
        for name, values in repeats.items():
            if url == INCOMING_URL and name == "type":
                values = ("incoming", "incoming")
            response = await client.get(
                url, params=[(name, value) for value in values], headers=user.headers
            )
            assert response.status_code == 422, (url, name)
            body = response.json()
            assert body["error"] == "validation_error"
            assert [
                (item["field"], item["location"], item["type"])
                for item in body["details"]
            ] == [(name, "query", "query_parameter_repeated")], (url, name)

    english = await client.get(
        MESSAGES_URL,
        params=[("type", "outgoing"), ("status", "sent"), ("type", "incoming")],
        headers={**user.headers, "Accept-Language": "en"},
    )
    spanish = await client.get(
        INCOMING_URL,
        params=[("order", "asc"), ("phone", "+34612345678"), ("order", "asc")],
        headers={**user.headers, "Accept-Language": "es"},
    )
    both = await client.get(
        MESSAGES_URL,
        params=[("order", "asc"), ("limit", "5"), ("order", "asc"), ("limit", "5")],
        headers=user.headers,
    )
    statuses = await client.get(
        MESSAGES_URL,
        params=[("status", "sent"), ("status", "failed"), ("order", "asc")],
        headers=user.headers,
    )

    assert english.json()["details"][0]["message"] == (
        "This query parameter takes a single value, but the request has it 2 times. "
        "Send it once. Only list parameters, such as 'status' in the listings, can be "
        "repeated."
    )
    assert spanish.json()["details"][0]["message"].startswith(
        "Este parámetro de consulta admite un solo valor, pero la solicitud lo trae "
        "2 veces."
    )
    assert [item["field"] for item in both.json()["details"]] == ["order", "limit"]
    assert statuses.status_code == 200, statuses.text


async def test_list_filters(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(default_region="MX", plan="pro")
    device = await register_device(client, owner)
    device_id = uuid.UUID(device["device_id"])
    jan = datetime(2026, 1, 15, 12, tzinfo=UTC)
    feb = datetime(2026, 2, 15, 12, tzinfo=UTC)
    sent = await _insert_message(
        session_factory,
        owner,
        status=MessageStatus.SENT,
        created_at=jan,
        device_id=device_id,
        to_number="+525512345678",
    )
    failed = await _insert_message(
        session_factory,
        owner,
        status=MessageStatus.FAILED,
        created_at=feb,
        to_number="+34612345678",
    )
    incoming = await _insert_message(
        session_factory,
        owner,
        type=MessageType.INCOMING,
        status=MessageStatus.RECEIVED,
        created_at=feb,
        to_number=None,
        from_number="+525512345678",
        device_id=device_id,
    )

    async def ids(params: Any) -> set[str]:
        return set(await _collect_ids(client, owner, MESSAGES_URL, params))

    assert await ids({"status": "sent"}) == {str(sent)}
    assert await ids([("status", "sent"), ("status", "failed")]) == {
        str(sent),
        str(failed),
    }
    assert await ids({"type": "incoming"}) == {str(incoming)}
    assert await ids({"device_id": str(device_id)}) == {str(sent), str(incoming)}
    # A national number read in the user's region matches both directions.
    assert await ids({"phone": "55 1234 5678"}) == {str(sent), str(incoming)}
    assert await ids({"date_from": "2026-02-01"}) == {str(failed), str(incoming)}
    assert await ids({"date_to": "2026-01-15"}) == {str(sent)}
    assert await ids({"date_to": "2026-01-15T11:59:59Z"}) == set()
    assert await ids(
        {"date_from": "2026-01-15T12:00:00Z", "date_to": "2026-01-15T12:00:00Z"}
    ) == {str(sent)}
    assert await ids({"status": "delivered"}) == set()
    # An unencoded "+" in a query string arrives as a space.
    unencoded = await client.get(
        f"{MESSAGES_URL}?phone=+34612345678&date_to=2026-02-15T13:00:00+01:00",
        headers=owner.headers,
    )
    assert unencoded.status_code == 200, unencoded.text
    assert [item["id"] for item in unencoded.json()["data"]["items"]] == [str(failed)]

    inverted = await client.get(
        MESSAGES_URL,
        params={"date_from": "2026-03-01", "date_to": "2026-02-01"},
        headers=owner.headers,
    )
    bad_phone = await client.get(
        MESSAGES_URL, params={"phone": "abc"}, headers=owner.headers
    )
    bad_status = await client.get(
        MESSAGES_URL, params={"status": "lost"}, headers=owner.headers
    )
    bad_date = await client.get(
        MESSAGES_URL, params={"date_from": "yesterday"}, headers=owner.headers
    )
    assert inverted.status_code == 400
    assert inverted.json()["error"] == "invalid_date_range"
    assert bad_phone.status_code == 400
    assert bad_phone.json()["error"] == "invalid_phone_number"
    assert bad_status.status_code == 422
    assert bad_date.status_code == 422


async def test_list_filter_phone_with_extension(
    client: AsyncClient, user: ApiUser
) -> None:
    response = await client.get(
        MESSAGES_URL, params={"phone": "+34 612 345 678 x99"}, headers=user.headers
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_phone_number"
    assert response.json()["reason"] == "has_extension"


async def test_list_filter_by_foreign_device(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="pro")
    stranger = await make_user(plan="pro")
    device = await register_device(client, owner)
    await _insert_message(
        session_factory, owner, device_id=uuid.UUID(device["device_id"])
    )
    deleted = await register_device(client, stranger)
    deleted_response = await client.delete(
        f"/api/v1/sms/devices/{deleted['device_id']}", headers=stranger.headers
    )
    assert deleted_response.status_code == 200, deleted_response.text

    for url in (MESSAGES_URL, INCOMING_URL):
        for device_id in (device["device_id"], str(uuid.uuid4()), deleted["device_id"]):
            response = await client.get(
                url,
                params={"device_id": device_id},
                headers={**stranger.headers, "Accept-Language": "en"},
            )

            assert response.status_code == 404, (url, device_id, response.text)
            body = response.json()
            assert body["error"] == "device_not_found"
            assert body["device_id"] == device_id
            assert device_id in body["message"]

    own = await client.get(
        MESSAGES_URL, params={"device_id": device["device_id"]}, headers=owner.headers
    )
    assert own.status_code == 200
    assert len(own.json()["data"]["items"]) == 1


async def test_incoming_listing(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    await _insert_message(session_factory, user)
    incoming = await _insert_message(
        session_factory,
        user,
        type=MessageType.INCOMING,
        status=MessageStatus.RECEIVED,
        to_number=None,
        from_number="+34612345678",
        body="Hola desde el teléfono",
    )

    listed = await client.get(INCOMING_URL, headers=user.headers)
    redundant = await client.get(
        INCOMING_URL, params={"type": "incoming"}, headers=user.headers
    )

    items = listed.json()["data"]["items"]
    assert [item["id"] for item in items] == [str(incoming)]
    assert items[0]["from"] == "+34612345678"
    assert items[0]["status"] == "received"
    assert redundant.status_code == 200
    assert [item["id"] for item in redundant.json()["data"]["items"]] == [str(incoming)]


async def test_incoming_listing_rejects_outgoing_type(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    await _insert_message(
        session_factory,
        user,
        type=MessageType.INCOMING,
        status=MessageStatus.RECEIVED,
        to_number=None,
        from_number="+34612345678",
    )

    response = await client.get(
        INCOMING_URL, params={"type": "outgoing"}, headers=user.headers
    )

    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "validation_error"
    assert "data" not in body
    assert [
        (item["field"], item["location"], item["type"]) for item in body["details"]
    ] == [("type", "query", "incoming_listing_type")]


async def test_errors_follow_accept_language(
    client: AsyncClient, user: ApiUser
) -> None:
    default = await send_sms(client, user, body=" ")
    english = await send_sms(
        client, user, body=" ", headers={"Accept-Language": "en-US,en;q=0.9"}
    )
    french = await send_sms(client, user, body=" ", headers={"Accept-Language": "fr"})
    sent = await send_sms(client, user, headers={"Accept-Language": "en"})

    assert (
        default.json()["message"]
        == "El texto del mensaje está vacío o solo contiene espacios o caracteres invisibles."
    )
    assert default.headers["content-language"] == "es"
    assert (
        english.json()["message"]
        == "The message body is empty or contains only whitespace or invisible characters."
    )
    assert english.headers["content-language"] == "en"
    assert english.json()["error"] == default.json()["error"] == "empty_body"
    assert french.json()["message"] == default.json()["message"]
    assert sent.json()["message"] == "Message queued for sending."


async def test_send_with_ttl_sets_expiry(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    sender = await make_user()

    response = await send_sms(client, sender, ttl=600)

    assert response.status_code == 201, response.text
    message_id = response.json()["data"]["message_id"]
    read = await client.get(
        f"/api/v1/sms/messages/{message_id}", headers=sender.headers
    )
    expires_at = datetime.fromisoformat(read.json()["data"]["expires_at"])
    remaining_s = (expires_at - datetime.now(UTC)).total_seconds()
    assert 590 < remaining_s <= 600


async def test_send_rejects_bad_expiry(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    sender = await make_user()
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()

    too_far = (datetime.now(UTC) + timedelta(days=31)).isoformat()

    in_the_past = await send_sms(client, sender, expires_at=past)
    both = await send_sms(client, sender, ttl=60, expires_at=future)
    negative = await send_sms(client, sender, ttl=-5)
    beyond_30_days = await send_sms(
        client, sender, expires_at=too_far, headers={"Accept-Language": "en"}
    )

    assert in_the_past.status_code == 400
    assert in_the_past.json()["error"] == "invalid_expiry"
    assert in_the_past.json()["reason"] == "in_the_past"
    assert in_the_past.json()["message"] == (
        "La fecha de expires_at ya ha pasado; envía una fecha futura."
    )
    assert both.status_code == 400
    assert both.json()["reason"] == "ttl_and_expires_at"
    assert beyond_30_days.status_code == 400
    assert beyond_30_days.json()["reason"] == "too_far"
    assert beyond_30_days.json()["message"] == (
        "expires_at is more than 30 days ahead, the longest allowed, as for ttl."
    )
    assert negative.status_code == 422
    assert await count_rows(session_factory, SMSMessage) == 0


async def test_send_bulk_with_expiry(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    sender = await make_user()
    future = datetime.now(UTC) + timedelta(hours=1)

    response = await client.post(
        "/api/v1/sms/send-bulk",
        json={
            "recipients": ["+525512345678", "+34612345678"],
            "body": "Hola",
            "expires_at": future.isoformat(),
        },
        headers=sender.headers,
    )

    assert response.status_code == 201, response.text
    async with session_factory() as session:
        rows = (await session.scalars(select(SMSMessage.expires_at))).all()
    assert len(rows) == 2
    assert all(abs((row - future).total_seconds()) < 1 for row in rows)


# Each is a valid ISO 8601 value whose instant in UTC, or whose end of day, falls
# outside what a Python datetime can hold.
LATEST_AT_MINUS_14 = "9999-12-31T23:59:59-14:00"
EARLIEST_AT_PLUS_14 = "0001-01-01T00:00:00+14:00"


async def test_list_date_bounds_at_extremes(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    outgoing = str(await _insert_message(session_factory, user))
    incoming = str(
        await _insert_message(
            session_factory,
            user,
            type=MessageType.INCOMING,
            status=MessageStatus.RECEIVED,
            to_number=None,
            from_number="+34612345678",
        )
    )
    everything = {outgoing, incoming}

    async def ids(params: dict[str, Any], url: str = MESSAGES_URL) -> set[str]:
        return set(await _collect_ids(client, user, url, params))

    assert await ids({"date_to": "9999-12-31"}) == everything
    assert await ids({"date_to": "9999-12-31T23:59:59.999999"}) == everything
    assert await ids({"date_to": LATEST_AT_MINUS_14}) == everything
    assert await ids({"date_to": "9999-12-31T23:59:59+14:00"}) == everything
    assert await ids({"date_from": "0001-01-01"}) == everything
    assert await ids({"date_from": EARLIEST_AT_PLUS_14}) == everything
    assert await ids({"date_from": "0001-01-01T00:00:00-14:00"}) == everything
    assert await ids({"date_from": LATEST_AT_MINUS_14}) == set()
    assert await ids({"date_from": "9999-12-31"}) == set()
    assert await ids({"date_to": EARLIEST_AT_PLUS_14}) == set()
    assert await ids({"date_to": "0001-01-01"}) == set()
    assert (
        await ids({"date_from": EARLIEST_AT_PLUS_14, "date_to": LATEST_AT_MINUS_14})
        == everything
    )
    assert await ids(
        {"date_from": "9999-12-31T10:00:00Z", "date_to": "9999-12-31"}
    ) == (set())
    assert await ids({"date_to": LATEST_AT_MINUS_14}, INCOMING_URL) == {incoming}
    assert await ids({"date_from": EARLIEST_AT_PLUS_14}, INCOMING_URL) == {incoming}


async def test_list_inverted_range_at_extremes(
    client: AsyncClient, user: ApiUser
) -> None:
    # 9999-12-31T23:59:59-14:00 is 10000-01-01T13:59:59Z, after the end of 9999-12-31.
    for params in (
        {"date_from": LATEST_AT_MINUS_14, "date_to": "9999-12-31"},
        {"date_from": "0001-01-01T00:00:00+00:00", "date_to": EARLIEST_AT_PLUS_14},
    ):
        response = await client.get(
            MESSAGES_URL,
            params=params,
            headers={**user.headers, "Accept-Language": "en"},
        )

        assert response.status_code == 400, params
        assert response.json()["error"] == "invalid_date_range"
        assert response.json()["message"] == (
            f"date_from ({params['date_from']}) is later than date_to "
            f"({params['date_to']})."
        )


def _forged_cursor(
    created_at: str, order: str = "desc", listing: str = "messages"
) -> str:
    payload = {"t": created_at, "i": str(uuid.uuid4()), "o": order, "l": listing}
    raw = base64.urlsafe_b64encode(json.dumps(payload).encode())
    return raw.rstrip(b"=").decode()


async def test_cursor_beyond_datetime_range(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    webhook = await client.post(
        "/api/v1/sms/webhooks",
        json={"url": "http://127.0.0.1:9/hook"},
        headers=owner.headers,
    )
    deliveries_url = f"/api/v1/sms/webhooks/{webhook.json()['data']['id']}/deliveries"

    listings = {
        MESSAGES_URL: "messages",
        INCOMING_URL: "incoming",
        deliveries_url: "webhook_deliveries",
    }
    for url, listing in listings.items():
        for created_at in (LATEST_AT_MINUS_14, EARLIEST_AT_PLUS_14):
            cursor = _forged_cursor(created_at, listing=listing)
            spanish = await client.get(
                url, params={"cursor": cursor}, headers=owner.headers
            )
            english = await client.get(
                url,
                params={"cursor": cursor},
                headers={**owner.headers, "Accept-Language": "en"},
            )

            assert spanish.status_code == 400, (url, created_at)
            assert spanish.json()["error"] == "invalid_cursor"
            assert spanish.json()["message"].startswith(
                "El cursor de paginación no es válido"
            )
            assert english.status_code == 400, (url, created_at)
            assert english.json()["message"].startswith(
                "The pagination cursor is invalid"
            )


async def test_cursor_with_offset_still_pages(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    older = await _insert_message(
        session_factory, user, created_at=datetime(2026, 1, 15, 12, tzinfo=UTC)
    )
    await _insert_message(
        session_factory, user, created_at=datetime(2026, 1, 15, 14, tzinfo=UTC)
    )

    # 13:00 UTC written at +05:00; the page after it holds only the older message.
    cursor = _forged_cursor("2026-01-15T18:00:00+05:00")
    ids = await _collect_ids(client, user, MESSAGES_URL, {"cursor": cursor})

    assert ids == [str(older)]


async def _first_page_cursor(
    client: AsyncClient, owner: ApiUser, url: str, params: dict[str, Any]
) -> str:
    response = await client.get(
        url, params={"limit": 1, **params}, headers=owner.headers
    )
    assert response.status_code == 200, (url, response.text)
    cursor: str | None = response.json()["data"]["next_cursor"]
    assert cursor is not None, url
    return cursor


async def test_cursor_rejected_by_other_listings(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user(plan="enterprise")
    for message_type, status in (
        (MessageType.OUTGOING, MessageStatus.PENDING),
        (MessageType.INCOMING, MessageStatus.RECEIVED),
    ):
        for _ in range(2):
            await _insert_message(
                session_factory, owner, type=message_type, status=status
            )
    for name in ("Pixel", "Moto"):
        await register_device(client, owner, name=name)
    webhook_ids = []
    for _ in range(2):
        created = await client.post(
            "/api/v1/sms/webhooks",
            json={"url": "http://127.0.0.1:9/hook"},
            headers=owner.headers,
        )
        assert created.status_code == 201, created.text
        webhook_ids.append(created.json()["data"]["id"])
    deliveries_url = f"/api/v1/sms/webhooks/{webhook_ids[0]}/deliveries"
    for _ in range(2):
        tested = await client.post(
            f"/api/v1/sms/webhooks/{webhook_ids[0]}/test", headers=owner.headers
        )
        assert tested.status_code == 200, tested.text
    for name in ("first", "second"):
        created = await client.post(
            "/api/v1/users/me/api-keys", json={"name": name}, headers=owner.headers
        )
        assert created.status_code == 201, created.text

    # The orders each listing accepts: the delivery log is newest first only and the
    # API key listing oldest first only.
    listings = {
        MESSAGES_URL: ("desc", "asc"),
        INCOMING_URL: ("desc", "asc"),
        "/api/v1/sms/devices": ("desc", "asc"),
        "/api/v1/sms/webhooks": ("desc", "asc"),
        deliveries_url: ("desc",),
        "/api/v1/users/me/api-keys": ("asc",),
    }
    cursors = {
        (url, order): await _first_page_cursor(
            client, owner, url, {"order": order} if len(orders) == 2 else {}
        )
        for url, orders in listings.items()
        for order in orders
    }

    checked = 0
    for (source, order), cursor in cursors.items():
        for target, orders in listings.items():
            if order not in orders:
                continue
            params = {
                "cursor": cursor,
                **({"order": order} if len(orders) == 2 else {}),
            }
            response = await client.get(target, params=params, headers=owner.headers)
            if target == source:
                assert response.status_code == 200, (source, target, order)
                continue
            assert response.status_code == 400, (source, target, order)
            assert response.json()["error"] == "invalid_cursor", (source, target)
            checked += 1
    assert checked == 40


async def test_old_message_cursor_stays_on_its_type(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    owner = await make_user()
    for _ in range(2):
        await _insert_message(session_factory, owner, status=MessageStatus.PENDING)
    cursor = await _first_page_cursor(client, owner, MESSAGES_URL, {})
    # The cursor as the API wrote it before cursors named their listing.
    payload = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    del payload["l"]
    old_cursor = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()

    own = await client.get(
        MESSAGES_URL, params={"cursor": old_cursor}, headers=owner.headers
    )
    incoming = await client.get(
        INCOMING_URL, params={"cursor": old_cursor}, headers=owner.headers
    )

    assert own.status_code == 200, own.text
    assert len(own.json()["data"]["items"]) == 1
    assert incoming.status_code == 400
    assert incoming.json()["error"] == "invalid_cursor"


async def test_send_expiry_at_extremes(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    sender = await make_user()
    cases = {
        LATEST_AT_MINUS_14: "too_far",
        "9999-12-31T23:59:59+14:00": "too_far",
        "9999-12-31": "too_far",
        EARLIEST_AT_PLUS_14: "in_the_past",
        "0001-01-01T00:00:00-14:00": "in_the_past",
        "0001-01-01": "in_the_past",
    }

    for expires_at, reason in cases.items():
        single = await send_sms(client, sender, expires_at=expires_at)
        bulk = await client.post(
            "/api/v1/sms/send-bulk",
            json={
                "recipients": ["+34612345678"],
                "body": "Hola",
                "expires_at": expires_at,
            },
            headers=sender.headers,
        )

        for response in (single, bulk):
            assert response.status_code == 400, (expires_at, response.text)
            assert response.json()["error"] == "invalid_expiry"
            assert response.json()["reason"] == reason
    assert await count_rows(session_factory, SMSMessage) == 0
