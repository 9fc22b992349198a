import uuid
from datetime import UTC, datetime

import pytest
from hub_helpers import (
    create_device,
    incoming_rows,
    open_socket,
    request,
)
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common import jsonutil
from mensajero_common.models import MessageStatus, WebhookConfig, WebhookEvent

Sessions = async_sessionmaker[AsyncSession]


def incoming(sender: str, body: str, sms_id: str | None) -> dict[str, object]:
    frame: dict[str, object] = {
        "type": "sms_incoming",
        "from": sender,
        "body": body,
        "timestamp": "2026-01-15T10:30:00Z",
    }
    if sms_id is not None:
        frame["sms_id"] = sms_id
    return frame


async def test_incoming_is_stored_and_acked(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, {"type": "register", "phone_number": "+34600999888"})
        ack = await request(socket, incoming("+34 611 22 33 44", "Hola", "sms-1"))
        # The ack comes only after the commit, so the row is there as soon as it arrives.
        rows = await incoming_rows(session_factory, device.device_id)

    assert ack["type"] == "ack"
    assert ack["of"] == "sms_incoming"
    assert ack["sms_id"] == "sms-1"
    assert len(rows) == 1
    row = rows[0]
    assert ack["message_id"] == str(row.id)
    assert row.status == MessageStatus.RECEIVED
    assert row.from_number == "+34611223344"
    assert row.to_number == "+34600999888"
    assert row.body == "Hola"
    assert row.user_id == device.user_id
    assert row.external_id == "sms-1"
    assert row.received_at == datetime(2026, 1, 15, 10, 30, tzinfo=UTC)


async def test_incoming_uploaded_twice_is_stored_once(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        first = await request(socket, incoming("+34611223344", "Hola", "sms-7"))
        second = await request(socket, incoming("+34611223344", "Hola", "sms-7"))
    async with open_socket(hub_url, device.api_key) as socket:
        after_reconnect = await request(
            socket, incoming("+34611223344", "Hola", "sms-7")
        )

    rows = await incoming_rows(session_factory, device.device_id)
    assert len(rows) == 1
    assert first["message_id"] == str(rows[0].id)
    assert second["message_id"] == first["message_id"]
    assert after_reconnect["message_id"] == first["message_id"]


async def test_identical_texts_with_different_ids_are_two_messages(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        first = await request(socket, incoming("+34611223344", "Ok", "sms-a"))
        second = await request(socket, incoming("+34611223344", "Ok", "sms-b"))

    rows = await incoming_rows(session_factory, device.device_id)
    assert len(rows) == 2
    assert first["message_id"] != second["message_id"]


async def test_sms_id_is_per_device(hub_url: str, session_factory: Sessions) -> None:
    device = await create_device(session_factory)
    other = await create_device(session_factory, user_id=device.user_id)

    async with open_socket(hub_url, device.api_key) as socket:
        first = await request(socket, incoming("+34611223344", "Ok", "sms-1"))
    async with open_socket(hub_url, other.api_key) as socket:
        second = await request(socket, incoming("+34611223344", "Ok", "sms-1"))

    assert first["message_id"] != second["message_id"]


async def test_incoming_without_sms_id_is_stored_each_time(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, incoming("+34611223344", "Hola", None))
        ack = await request(socket, incoming("+34611223344", "Hola", None))

    rows = await incoming_rows(session_factory, device.device_id)
    assert len(rows) == 2
    assert "sms_id" not in ack


async def test_incoming_keeps_short_codes_and_names(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, incoming("Movistar", "Tu saldo", "a"))
        await request(socket, incoming("22777", "Codigo 1234", "b"))

    senders = {
        row.from_number
        for row in await incoming_rows(session_factory, device.device_id)
    }
    assert senders == {"Movistar", "22777"}


async def test_incoming_keeps_sender_with_extension(
    hub_url: str, session_factory: Sessions
) -> None:
    # No SMS comes from an extension, so the sender is kept as the phone sent it
    # rather than stored as the main line's number, which did not send it.
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        ack = await request(socket, incoming("+34 612 345 678 ext. 12", "Hola", "a"))

    rows = await incoming_rows(session_factory, device.device_id)
    assert ack["type"] == "ack"
    assert [row.from_number for row in rows] == ["+34 612 345 678 ext. 12"]


async def test_incoming_counts_segments_and_encoding(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, incoming("+34611223344", "Hola", "plain"))
        await request(socket, incoming("+34611223344", "Hola 😀 مرحبا", "emoji"))
        await request(socket, incoming("+34611223344", "a" * 161, "long"))

    rows = {
        row.external_id: row
        for row in await incoming_rows(session_factory, device.device_id)
    }
    assert (rows["plain"].encoding, rows["plain"].segments) == ("gsm7", 1)
    assert (rows["emoji"].encoding, rows["emoji"].segments) == ("ucs2", 1)
    assert (rows["long"].encoding, rows["long"].segments) == ("gsm7", 2)


async def test_incoming_reads_other_scripts_senders(
    hub_url: str, session_factory: Sessions
) -> None:
    # A fullwidth plus and fullwidth or Arabic-Indic digits, as some phones write them.
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, incoming("＋３４６１１２２３３４４", "Hola", "fullwidth"))
        await request(socket, incoming("+٣٤٦١١٢٢٣٣٤٤", "Hola", "arabic"))

    senders = [
        row.from_number
        for row in await incoming_rows(session_factory, device.device_id)
    ]
    assert senders == ["+34611223344", "+34611223344"]


async def test_incoming_without_timestamp_uses_now(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    before = datetime.now(UTC)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(
            socket, {"type": "sms_incoming", "from": "+34611223344", "body": "Hola"}
        )

    rows = await incoming_rows(session_factory, device.device_id)
    assert rows[0].received_at is not None
    assert rows[0].received_at >= before.replace(microsecond=0)


async def test_incoming_rejects_overlong_sender(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        error = await request(socket, incoming("X" * 40, "Hola", "sms-1"))

    assert error["type"] == "error"
    assert error["error"] == "invalid_frame"
    assert await incoming_rows(session_factory, device.device_id) == []


@pytest.mark.parametrize(
    ("sender", "stored"),
    [
        ("a\x01b", "ab"),
        ("\x1b[31mBanco", "[31mBanco"),
        ("Movi\x7fstar\x85", "Movistar"),
        ("\u202eknab\u202c", "knab"),
        ("\u2066Movistar\u2069", "Movistar"),
        ("\t+34 611 22 33 44\n", "+34611223344"),
        ("+34\u202d611223344", "+34611223344"),
        ("\x01\u202e", "unknown"),
        (" \u2067 ", "unknown"),
    ],
)
async def test_incoming_removes_sender_controls(
    hub_url: str, session_factory: Sessions, sender: str, stored: str
) -> None:
    device = await create_device(session_factory)
    async with session_factory() as db:
        db.add(
            WebhookConfig(
                user_id=device.user_id,
                url="https://example.com/hook",
                secret_key="whsec_test",
                events=["sms_received"],
            )
        )
        await db.commit()

    async with open_socket(hub_url, device.api_key) as socket:
        ack = await request(socket, incoming(sender, "Hola", "sms-1"))

    rows = await incoming_rows(session_factory, device.device_id)
    async with session_factory() as db:
        event_body = (
            await db.execute(
                select(WebhookEvent.body).where(
                    WebhookEvent.message_id == uuid.UUID(ack["message_id"])
                )
            )
        ).scalar_one()
    assert ack["type"] == "ack"
    assert [row.from_number for row in rows] == [stored]
    assert jsonutil.loads(event_body)["from"] == stored


async def test_incoming_records_webhook_event_once(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    async with session_factory() as db:
        db.add(
            WebhookConfig(
                user_id=device.user_id,
                url="https://example.com/hook",
                secret_key="whsec_test",
                events=["sms_received"],
            )
        )
        await db.commit()

    async with open_socket(hub_url, device.api_key) as socket:
        ack = await request(socket, incoming("+34611223344", "Hola", "sms-1"))
        await request(socket, incoming("+34611223344", "Hola", "sms-1"))

    async with session_factory() as db:
        events = (
            await db.execute(
                select(WebhookEvent.event).where(
                    WebhookEvent.message_id == uuid.UUID(ack["message_id"])
                )
            )
        ).scalars()
        assert list(events) == ["sms_received"]
