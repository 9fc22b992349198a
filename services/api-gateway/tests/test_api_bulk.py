import asyncio
import dataclasses
import json
import uuid
from typing import Any

import asyncpg
import pytest
from api_test_helpers import ApiUser, MakeUser, count_rows, register_device
from fastapi import FastAPI
from httpx import AsyncClient, Response
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.bulk.repository import MessageColumns, MessageWriter
from mensajero_api.main import MAX_REQUEST_BODY_BYTES
from mensajero_common.keys import RedisKeys
from mensajero_common.models import (
    MessageStatus,
    SMSBulkTask,
    SMSMessage,
    UserQuota,
)
from mensajero_common.settings import Settings

BULK_URL = "/api/v1/sms/send-bulk"
PROGRESS_URL = "/api/v1/sms/bulk"

SessionFactory = async_sessionmaker[AsyncSession]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Bursts of parallel requests below must meet the quota, not the request rate limit.
    return settings.model_copy(update={"RATE_LIMIT_ENABLED": False})


def _numbers(count: int, start: int = 0) -> list[str]:
    return [f"+52551234{n:04d}" for n in range(start, start + count)]


async def _send_bulk(
    client: AsyncClient,
    sender: ApiUser,
    payload: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Response:
    return await client.post(
        BULK_URL, json=payload, headers={**sender.headers, **(headers or {})}
    )


async def _set_sms_sent(
    session_factory: SessionFactory, user: ApiUser, used: int
) -> None:
    async with session_factory() as session:
        await session.execute(
            update(UserQuota)
            .where(UserQuota.user_id == user.id)
            .values(sms_sent_this_month=used)
        )
        await session.commit()


async def _sms_sent(session_factory: SessionFactory, user: ApiUser) -> int:
    async with session_factory() as session:
        used = await session.scalar(
            select(UserQuota.sms_sent_this_month).where(UserQuota.user_id == user.id)
        )
    assert used is not None
    return used


async def _messages(
    session_factory: SessionFactory, user: ApiUser
) -> dict[uuid.UUID, SMSMessage]:
    async with session_factory() as session:
        rows = await session.scalars(
            select(SMSMessage).where(SMSMessage.user_id == user.id)
        )
        return {row.id: row for row in rows}


async def _stream_message_ids(redis: Redis, redis_keys: RedisKeys) -> list[str]:
    entries = await redis.xrange(redis_keys.new_messages_stream)
    return [fields[b"message_id"].decode() for _, fields in entries]


async def test_bulk_send_creates_messages(
    client: AsyncClient,
    user: ApiUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: SessionFactory,
) -> None:
    recipients = _numbers(3)

    response = await _send_bulk(
        client, user, {"recipients": recipients, "body": "Hola"}
    )

    assert response.status_code == 201, response.text
    body = response.json()
    assert (
        body["message"]
        == "Mensajes en cola para envío: 3; destinatarios rechazados: 0."
    )
    data = body["data"]
    assert set(data) == {
        "task_id",
        "total_recipients",
        "accepted",
        "status",
        "message_ids",
        "rejected",
    }
    assert data["total_recipients"] == 3
    assert data["accepted"] == 3
    assert data["status"] == "processing"
    assert data["rejected"] == []
    message_ids = [uuid.UUID(value) for value in data["message_ids"]]
    assert len(set(message_ids)) == 3

    stored = await _messages(session_factory, user)
    assert set(stored) == set(message_ids)
    assert [stored[i].to_number for i in message_ids] == recipients
    for message in stored.values():
        assert message.status == MessageStatus.PENDING
        assert message.body == "Hola"
        assert message.bulk_id == uuid.UUID(data["task_id"])
        assert message.device_id is None
    assert await _sms_sent(session_factory, user) == 3
    assert await _stream_message_ids(redis, redis_keys) == data["message_ids"]


async def test_bulk_mixed_valid_and_invalid(
    client: AsyncClient,
    make_user: MakeUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: SessionFactory,
) -> None:
    owner = await make_user(plan="pro")
    recipients = [
        "+525512340001",
        "12345",
        "+525512340002",
        "+52 55 1234 0001",
        "+99912345678",
        "+5255123",
        "+525512340003",
    ]

    response = await _send_bulk(
        client,
        owner,
        {"recipients": recipients, "body": "Hola"},
        headers={"Accept-Language": "en"},
    )

    assert response.status_code == 201, response.text
    data = response.json()["data"]
    assert data["total_recipients"] == 7
    assert data["accepted"] == 3
    assert data["rejected"] == [
        {
            "index": 1,
            "number": "12345",
            "reason": "missing_country_code",
            "message": "The number 12345 is invalid: it has no international "
            "prefix (+ and the country code), and your account has no default "
            "region. Use the E.164 format, for example +525512345678.",
            "duplicate_of": None,
        },
        {
            "index": 3,
            "number": "+52 55 1234 0001",
            "reason": "duplicate",
            "message": "Repeats the recipient at position 0; it is sent only once.",
            "duplicate_of": 0,
        },
        {
            "index": 4,
            "number": "+99912345678",
            "reason": "invalid_country_code",
            "message": "The number +99912345678 is invalid: the country code "
            "does not exist. Use the E.164 format, for example +525512345678.",
            "duplicate_of": None,
        },
        {
            "index": 5,
            "number": "+5255123",
            "reason": "too_short",
            "message": "The number +5255123 is invalid: it has too few digits. "
            "Use the E.164 format, for example +525512345678.",
            "duplicate_of": None,
        },
    ]
    stored = await _messages(session_factory, owner)
    assert sorted(m.to_number or "" for m in stored.values()) == [
        "+525512340001",
        "+525512340002",
        "+525512340003",
    ]
    assert await _sms_sent(session_factory, owner) == 3
    assert len(await _stream_message_ids(redis, redis_keys)) == 3


async def test_bulk_national_numbers_use_region(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(default_region="MX", plan="pro")

    response = await _send_bulk(
        client, owner, {"recipients": ["55 1234 5678", "+34612345678"], "body": "Hola"}
    )

    assert response.status_code == 201, response.text
    stored = await _messages(session_factory, owner)
    assert sorted(m.to_number or "" for m in stored.values()) == [
        "+34612345678",
        "+525512345678",
    ]


async def test_bulk_rejects_numbers_with_extension(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="pro")
    recipients = ["+34612345678", "+34 612 345 679 ext. 12", "+34612345670;ext=1"]

    response = await _send_bulk(
        client, owner, {"recipients": recipients, "body": "Hola"}
    )
    only_extensions = await _send_bulk(
        client, owner, {"recipients": ["+34 612 345 678 x99"], "body": "Hola"}
    )

    assert response.status_code == 201, response.text
    rejected = response.json()["data"]["rejected"]
    assert [(item["index"], item["reason"]) for item in rejected] == [
        (1, "has_extension"),
        (2, "has_extension"),
    ]
    stored = await _messages(session_factory, owner)
    assert [m.to_number for m in stored.values()] == ["+34612345678"]
    assert only_extensions.status_code == 400
    assert only_extensions.json()["error"] == "no_valid_recipients"


async def test_bulk_personalised_messages(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="pro")
    messages = [
        {"to": "+525512340001", "body": "Hola Ana"},
        {"to": "+525512340002", "body": "Hola Luis"},
        # The same number with another text is a message of its own.
        {"to": "+525512340001", "body": "Tu cita es mañana"},
        {"to": "+525512340001", "body": "Hola Ana"},
        {"to": "+525512340003", "body": "   "},
        {"to": "+525512340004", "body": "x" * 1601},
    ]

    response = await _send_bulk(client, owner, {"messages": messages})

    assert response.status_code == 201, response.text
    data = response.json()["data"]
    assert data["accepted"] == 3
    assert [(r["index"], r["reason"]) for r in data["rejected"]] == [
        (3, "duplicate"),
        (4, "empty_body"),
        (5, "body_too_long"),
    ]
    assert data["rejected"][0]["duplicate_of"] == 0
    assert (
        data["rejected"][1]["message"]
        == "El texto del mensaje está vacío o solo contiene espacios o caracteres invisibles."
    )
    assert data["rejected"][2]["message"] == (
        "El texto tiene 1601 caracteres; el máximo es 1600."
    )
    stored = await _messages(session_factory, owner)
    bodies = [stored[uuid.UUID(i)].body for i in data["message_ids"]]
    assert bodies == ["Hola Ana", "Hola Luis", "Tu cita es mañana"]
    assert await _sms_sent(session_factory, owner) == 3


async def test_bulk_rejects_invisible_bodies(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="pro")
    messages = [
        {"to": "+525512340001", "body": "\u200b"},
        {"to": "+525512340002", "body": "👩\u200d💻"},
        {"to": "+525512340003", "body": "\ufeff \u2060"},
        {"to": "+525512340004", "body": "Hola\u200bAna"},
    ]

    response = await _send_bulk(client, owner, {"messages": messages})

    assert response.status_code == 201, response.text
    data = response.json()["data"]
    assert data["accepted"] == 2
    assert [(r["index"], r["reason"]) for r in data["rejected"]] == [
        (0, "empty_body"),
        (2, "empty_body"),
    ]
    stored = await _messages(session_factory, owner)
    bodies = [stored[uuid.UUID(i)].body for i in data["message_ids"]]
    assert bodies == ["👩\u200d💻", "Hola\u200bAna"]
    assert await _sms_sent(session_factory, owner) == 2


async def test_bulk_counts_segments_per_body(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="pro")
    messages = [
        {"to": "+525512340001", "body": "corto"},
        {"to": "+525512340002", "body": "y" * 161},
        {"to": "+525512340003", "body": "ñandú " * 20},
    ]

    response = await _send_bulk(client, owner, {"messages": messages})

    assert response.status_code == 201, response.text
    stored = await _messages(session_factory, owner)
    ids = [uuid.UUID(i) for i in response.json()["data"]["message_ids"]]
    assert [(stored[i].segments, stored[i].encoding) for i in ids] == [
        (1, "gsm7"),
        (2, "gsm7"),
        (2, "ucs2"),
    ]
    # Each message counts once, however many segments it takes.
    assert await _sms_sent(session_factory, owner) == 3


@pytest.mark.parametrize(
    ("language", "message"),
    [
        (
            "es",
            "Este envío necesita 4 SMS, pero este mes solo te quedan 3, así que no se "
            "ha enviado ninguno. Envía como máximo 3, o espera hasta el {reset_date} a "
            "las 00:00 UTC. Para enviar más antes, pide al administrador de este "
            "servidor Mensajero un plan mayor (los planes están en /api/v1/sms/plans).",
        ),
        (
            "en",
            "This send needs 4 SMS, but you have only 3 left this month, so none was "
            "sent. Send at most 3, or wait until {reset_date} at 00:00 UTC. To send "
            "more sooner, ask the administrator of this Mensajero server for a larger "
            "plan (plans are listed at /api/v1/sms/plans).",
        ),
    ],
)
async def test_bulk_over_quota_creates_nothing(
    client: AsyncClient,
    make_user: MakeUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: SessionFactory,
    language: str,
    message: str,
) -> None:
    owner = await make_user(plan="free")
    await _set_sms_sent(session_factory, owner, 47)

    response = await _send_bulk(
        client,
        owner,
        {"recipients": _numbers(4), "body": "Hola"},
        headers={"Accept-Language": language},
    )

    assert response.status_code == 429
    body = response.json()
    assert body["error"] == "quota_exceeded"
    assert body["message"] == message.format(reset_date=body["reset_date"])
    assert body["quota_type"] == "sms_monthly"
    assert (body["limit"], body["used"], body["available"]) == (50, 47, 3)
    assert body["upgrade_url"] == "/api/v1/sms/plans"
    assert body["reset_at"] == body["reset_date"] + "T00:00:00Z"
    assert int(response.headers["retry-after"]) > 0
    assert await count_rows(session_factory, SMSMessage) == 0
    assert await count_rows(session_factory, SMSBulkTask) == 0
    assert await _sms_sent(session_factory, owner) == 47
    assert await _stream_message_ids(redis, redis_keys) == []


async def test_bulk_quota_edge(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="free")
    await _set_sms_sent(session_factory, owner, 47)

    fits = await _send_bulk(client, owner, {"recipients": _numbers(3), "body": "a"})
    one_more = await _send_bulk(client, owner, {"recipients": _numbers(1), "body": "b"})

    assert fits.status_code == 201, fits.text
    assert one_more.status_code == 429
    assert one_more.json()["message"].startswith(
        "Este envío necesita 1 SMS, pero este mes no te queda ninguno, así que no se "
        "ha enviado nada. Podrás enviar más desde el "
    )
    assert await _sms_sent(session_factory, owner) == 50


async def test_bulk_rejected_recipients_not_charged(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="free")
    await _set_sms_sent(session_factory, owner, 48)
    # Two valid, one duplicate and one invalid: only the two valid ones need quota.
    recipients = [*_numbers(2), _numbers(1)[0], "not a number"]

    response = await _send_bulk(
        client, owner, {"recipients": recipients, "body": "Hola"}
    )

    assert response.status_code == 201, response.text
    assert response.json()["data"]["accepted"] == 2
    assert await _sms_sent(session_factory, owner) == 50


async def test_bulk_chunks_keep_request_order(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="pro")
    await _set_sms_sent(session_factory, owner, 100)
    # More than two insert chunks, with a duplicate of an earlier chunk's recipient
    # and an invalid number in a later chunk.
    recipients = _numbers(600)
    recipients[300] = recipients[10]
    recipients[550] = "12"

    response = await _send_bulk(
        client, owner, {"recipients": recipients, "body": "Hola"}
    )

    assert response.status_code == 201, response.text
    data = response.json()["data"]
    assert data["accepted"] == 598
    assert [(item["index"], item["reason"]) for item in data["rejected"]] == [
        (300, "duplicate"),
        (550, "missing_country_code"),
    ]
    assert data["rejected"][0]["duplicate_of"] == 10
    message_ids = [uuid.UUID(value) for value in data["message_ids"]]
    stored = await _messages(session_factory, owner)
    assert set(stored) == set(message_ids)
    sent_to = [
        number for index, number in enumerate(recipients) if index not in (300, 550)
    ]
    assert [stored[i].to_number for i in message_ids] == sent_to
    async with session_factory() as session:
        task = await session.get(SMSBulkTask, uuid.UUID(data["task_id"]))
    assert task is not None
    assert task.message_ids == message_ids
    assert [item["index"] for item in task.rejected] == [300, 550]
    # Charged for all 600 at first, then the two rejected ones are given back.
    assert await _sms_sent(session_factory, owner) == 100 + 598


def _message_columns(owner: ApiUser, *ids: uuid.UUID) -> MessageColumns:
    shared = {
        "user_id": owner.id,
        "type": "outgoing",
        "status": "pending",
        "device_id": None,
        "requested_device_id": None,
        "expires_at": None,
        "bulk_id": None,
        "body": "Hola",
        "segments": 1,
        "encoding": "gsm7",
    }
    return MessageColumns(
        shared=shared, ids=list(ids), to_numbers=["+525512340000"] * len(ids)
    )


async def test_message_writer_raises_insert_error(
    make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    message_id = uuid.uuid4()

    async with session_factory() as session:
        writer = await MessageWriter.open(session)
        await writer.write(_message_columns(owner, message_id, message_id))
        with pytest.raises(asyncpg.UniqueViolationError):
            await writer.flush()
        await session.rollback()

    assert await count_rows(session_factory, SMSMessage, user_id=owner.id) == 0


async def test_message_writer_settles_before_rollback(
    make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    message_id = uuid.uuid4()

    async with session_factory() as session:
        writer = await MessageWriter.open(session)
        await writer.write(_message_columns(owner, message_id, message_id))
        await writer.settle()
        # The connection is free again: the rollback and the next insert run.
        await session.rollback()
        writer = await MessageWriter.open(session)
        await writer.write(_message_columns(owner, uuid.uuid4()))
        await writer.flush()
        await session.commit()

    assert await count_rows(session_factory, SMSMessage, user_id=owner.id) == 1


async def test_bulk_max_recipients_edge(
    client: AsyncClient,
    make_user: MakeUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: SessionFactory,
) -> None:
    owner = await make_user(plan="enterprise")

    at_limit = await _send_bulk(
        client, owner, {"recipients": _numbers(1000), "body": "Hola"}
    )
    over_limit = await _send_bulk(
        client,
        owner,
        {"recipients": _numbers(1001), "body": "Hola"},
        headers={"Accept-Language": "en"},
    )

    assert at_limit.status_code == 201, at_limit.text
    assert at_limit.json()["data"]["accepted"] == 1000
    assert await count_rows(session_factory, SMSMessage, user_id=owner.id) == 1000
    assert len(await _stream_message_ids(redis, redis_keys)) == 1000

    assert over_limit.status_code == 400
    assert over_limit.json() == {
        "success": False,
        "error": "too_many_recipients",
        "message": "The request has 1001 recipients; the maximum is 1000. "
        "Split it into several requests.",
        "count": 1001,
        "limit": 1000,
    }
    assert await _sms_sent(session_factory, owner) == 1000


async def test_bulk_no_valid_recipients(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="pro")

    response = await _send_bulk(
        client, owner, {"recipients": ["123", "+99912345678"], "body": "Hola"}
    )

    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "no_valid_recipients"
    assert (
        body["message"] == "Ningún destinatario es válido; revisa la lista 'rejected'."
    )
    assert [(r["index"], r["reason"]) for r in body["rejected"]] == [
        (0, "missing_country_code"),
        (1, "invalid_country_code"),
    ]
    assert await count_rows(session_factory, SMSBulkTask) == 0
    assert await _sms_sent(session_factory, owner) == 0


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"recipients": ["+525512340001"], "body": " "}, "empty_body"),
        ({"recipients": ["+525512340001"], "body": "\u200b\u2060"}, "empty_body"),
        ({"recipients": ["+525512340001"], "body": "x" * 1601}, "body_too_long"),
    ],
)
async def test_bulk_shared_body_invalid(
    client: AsyncClient,
    user: ApiUser,
    session_factory: SessionFactory,
    payload: dict[str, Any],
    error: str,
) -> None:
    response = await _send_bulk(client, user, payload)

    assert response.status_code == 400
    assert response.json()["error"] == error
    assert await count_rows(session_factory, SMSMessage) == 0


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"recipients": ["+525512340001"]},
        {"body": "Hola"},
        {"recipients": [], "body": "Hola"},
        {"messages": []},
        {"messages": [{"to": "+525512340001", "body": "a"}], "body": "Hola"},
        {
            "messages": [{"to": "+525512340001", "body": "a"}],
            "recipients": ["+525512340002"],
        },
        {"recipients": ["+" + "1" * 70], "body": "Hola"},
        {"recipients": [5512345678], "body": "Hola"},
    ],
)
async def test_bulk_malformed_request(
    client: AsyncClient, user: ApiUser, payload: dict[str, Any]
) -> None:
    response = await _send_bulk(client, user, payload)

    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"


async def test_bulk_from_own_device(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="pro")
    device = await register_device(client, owner)

    response = await _send_bulk(
        client,
        owner,
        {"recipients": _numbers(2), "body": "Hola", "device_id": device["device_id"]},
    )

    assert response.status_code == 201, response.text
    for message in (await _messages(session_factory, owner)).values():
        assert str(message.device_id) == device["device_id"]
        assert str(message.requested_device_id) == device["device_id"]


async def test_bulk_device_errors(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="pro")
    stranger = await make_user(plan="pro")
    foreign = await register_device(client, stranger)
    disabled = await register_device(client, owner)
    await client.put(
        f"/api/v1/sms/devices/{disabled['device_id']}",
        json={"is_active": False},
        headers=owner.headers,
    )

    not_found = await _send_bulk(
        client,
        owner,
        {"recipients": _numbers(1), "body": "Hola", "device_id": foreign["device_id"]},
    )
    inactive = await _send_bulk(
        client,
        owner,
        {"recipients": _numbers(1), "body": "Hola", "device_id": disabled["device_id"]},
    )

    assert not_found.status_code == 404
    assert not_found.json()["error"] == "device_not_found"
    assert inactive.status_code == 409
    assert inactive.json()["error"] == "device_inactive"
    assert await count_rows(session_factory, SMSMessage) == 0


async def test_bulk_progress_counts(
    client: AsyncClient, user: ApiUser, session_factory: SessionFactory
) -> None:
    sent = await _send_bulk(
        client, user, {"recipients": [*_numbers(4), "bad"], "body": "Hola"}
    )
    data = sent.json()["data"]
    task_url = f"{PROGRESS_URL}/{data['task_id']}"

    pending = await client.get(task_url, headers=user.headers)

    assert pending.status_code == 200, pending.text
    progress = pending.json()["data"]
    assert progress["task_id"] == data["task_id"]
    assert progress["status"] == "processing"
    assert progress["total_recipients"] == 5
    assert progress["accepted"] == 4
    assert progress["counts"] == {
        "pending": 4,
        "assigned": 0,
        "sending": 0,
        "sent": 0,
        "delivered": 0,
        "failed": 0,
        "expired": 0,
    }
    assert [r["index"] for r in progress["rejected"]] == [4]
    assert progress["device_id"] is None

    ids = [uuid.UUID(value) for value in data["message_ids"]]
    final = [MessageStatus.DELIVERED, MessageStatus.SENT, MessageStatus.FAILED]
    async with session_factory() as session:
        for message_id, status in zip(ids, final, strict=False):
            await session.execute(
                update(SMSMessage)
                .where(SMSMessage.id == message_id)
                .values(status=status)
            )
        await session.commit()

    partial = (await client.get(task_url, headers=user.headers)).json()["data"]
    assert partial["status"] == "processing"
    assert partial["counts"]["pending"] == 1
    assert partial["counts"]["delivered"] == 1
    assert partial["counts"]["sent"] == 1
    assert partial["counts"]["failed"] == 1

    async with session_factory() as session:
        await session.execute(
            update(SMSMessage)
            .where(SMSMessage.id == ids[3])
            .values(status=MessageStatus.EXPIRED)
        )
        await session.commit()
    done = (await client.get(task_url, headers=user.headers)).json()["data"]
    assert done["status"] == "completed"
    assert done["counts"]["pending"] == 0
    assert done["counts"]["expired"] == 1


async def test_bulk_progress_of_other_user(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user(plan="pro")
    stranger = await make_user(plan="pro")
    sent = await _send_bulk(client, owner, {"recipients": _numbers(1), "body": "Hola"})
    task_id = sent.json()["data"]["task_id"]

    foreign = await client.get(f"{PROGRESS_URL}/{task_id}", headers=stranger.headers)
    unknown = await client.get(f"{PROGRESS_URL}/{uuid.uuid4()}", headers=owner.headers)
    malformed = await client.get(f"{PROGRESS_URL}/not-a-uuid", headers=owner.headers)

    assert foreign.status_code == 404
    assert foreign.json()["error"] == "bulk_task_not_found"
    assert foreign.json()["task_id"] == task_id
    assert unknown.status_code == 404
    assert malformed.status_code == 422


async def test_bulk_idempotent_repeat(
    client: AsyncClient,
    user: ApiUser,
    redis: Redis,
    redis_keys: RedisKeys,
    session_factory: SessionFactory,
) -> None:
    key = {"Idempotency-Key": "campaign-42"}
    payload = {"recipients": [*_numbers(2), "bad"], "body": "Hola"}

    first = await _send_bulk(client, user, payload, headers=key)
    repeat = await _send_bulk(
        client, user, payload, headers={**key, "Accept-Language": "en"}
    )
    other = await _send_bulk(client, user, {**payload, "body": "Adiós"}, headers=key)

    assert first.status_code == 201
    assert repeat.status_code == 200
    assert repeat.headers["idempotent-replayed"] == "true"
    first_data, repeat_data = first.json()["data"], repeat.json()["data"]
    assert repeat_data["task_id"] == first_data["task_id"]
    assert repeat_data["message_ids"] == first_data["message_ids"]
    assert repeat_data["rejected"][0]["message"].startswith("The number bad")
    assert other.status_code == 409
    assert other.json()["error"] == "idempotency_key_reused"
    assert await count_rows(session_factory, SMSMessage) == 2
    assert await _sms_sent(session_factory, user) == 2
    assert len(await _stream_message_ids(redis, redis_keys)) == 2


async def test_bulk_repeat_outlives_lower_limit(
    app: FastAPI,
    client: AsyncClient,
    user: ApiUser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A repeat returns the first result even after the limit it met has been lowered.
    key = {"Idempotency-Key": "campaign-43"}
    payload = {"recipients": _numbers(3), "body": "Hola"}
    first = await _send_bulk(client, user, payload, headers=key)
    resources = app.state.resources
    lowered = resources.settings.model_copy(update={"BULK_MAX_RECIPIENTS": 2})
    monkeypatch.setattr(
        app.state, "resources", dataclasses.replace(resources, settings=lowered)
    )

    repeat = await _send_bulk(client, user, payload, headers=key)
    new_key = await _send_bulk(
        client, user, payload, headers={"Idempotency-Key": "campaign-44"}
    )

    assert first.status_code == 201
    assert repeat.status_code == 200
    assert repeat.json()["data"]["task_id"] == first.json()["data"]["task_id"]
    assert new_key.status_code == 400
    assert new_key.json()["error"] == "too_many_recipients"


async def test_idempotency_key_scoped_per_endpoint(
    client: AsyncClient, user: ApiUser, session_factory: SessionFactory
) -> None:
    headers = {**user.headers, "Idempotency-Key": "order-7"}

    single = await client.post(
        "/api/v1/sms/send",
        json={"to": "+525512349999", "body": "Hola"},
        headers=headers,
    )
    bulk = await _send_bulk(
        client, user, {"recipients": _numbers(1), "body": "Hola"}, headers=headers
    )

    # The key of a send and the key of a bulk send are separate: both are new.
    assert single.status_code == 201, single.text
    assert bulk.status_code == 201, bulk.text
    assert "idempotent-replayed" not in bulk.headers
    assert await count_rows(session_factory, SMSMessage) == 2


def _messages_body(count: int, body_length: int) -> bytes:
    """Encode `count` personalised messages as Python's json.dumps writes them."""
    messages = [{"to": number, "body": "x" * body_length} for number in _numbers(count)]
    return json.dumps({"messages": messages}).encode()


async def test_bulk_messages_within_body_limit(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="pro")
    headers = {**owner.headers, "Content-Type": "application/json"}
    # The practical limits that the README gives next to BULK_MAX_RECIPIENTS.
    longest_texts = _messages_body(1000, 1600)
    fitting_longest_texts = _messages_body(640, 1600)
    all_with_short_texts = _messages_body(1000, 1000)

    too_large = await client.post(BULK_URL, content=longest_texts, headers=headers)
    assert too_large.status_code == 413
    assert too_large.json()["error"] == "payload_too_large"
    assert await count_rows(session_factory, SMSMessage) == 0

    for content, count in ((fitting_longest_texts, 640), (all_with_short_texts, 1000)):
        assert len(content) <= MAX_REQUEST_BODY_BYTES
        response = await client.post(BULK_URL, content=content, headers=headers)
        assert response.status_code == 201, response.text[:300]
        assert response.json()["data"]["accepted"] == count


async def test_bulk_idempotent_concurrent_repeats(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="free")
    # Room for exactly one batch: a repeat must replay it, not meet the spent quota.
    await _set_sms_sent(session_factory, owner, 45)
    key = {"Idempotency-Key": str(uuid.uuid4())}
    payload = {"recipients": _numbers(5), "body": "same"}

    responses = await asyncio.gather(
        *(_send_bulk(client, owner, payload, headers=key) for _ in range(8))
    )

    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
    assert len({r.json()["data"]["task_id"] for r in responses}) == 1
    assert await count_rows(session_factory, SMSBulkTask) == 1
    assert await count_rows(session_factory, SMSMessage) == 5
    assert await _sms_sent(session_factory, owner) == 50


async def test_parallel_bulks_share_quota(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="free")
    await _set_sms_sent(session_factory, owner, 38)

    responses = await asyncio.gather(
        *(
            _send_bulk(client, owner, {"recipients": _numbers(5, 10 * n), "body": "x"})
            for n in range(10)
        )
    )

    codes = [response.status_code for response in responses]
    assert codes.count(201) == 2
    assert codes.count(429) == 8
    assert await count_rows(session_factory, SMSMessage) == 10
    assert await count_rows(session_factory, SMSBulkTask) == 2
    assert await _sms_sent(session_factory, owner) == 48
