import pytest
from hub_helpers import (
    create_device,
    load_device,
    open_socket,
    receive,
    request,
    send,
    wait_closed,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common import protocol
from mensajero_hub.core.state import MAX_CONSECUTIVE_ERRORS

Sessions = async_sessionmaker[AsyncSession]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", "invalid_frame"),
        ('["a", "list"]', "invalid_frame"),
        ('{"no_type": 1}', "invalid_frame"),
        ('{"type": "selfie"}', "unknown_frame_type"),
        ('{"type": "sms_report", "status": "sent"}', "invalid_frame"),
        (
            '{"type": "sms_report", "message_id": "nope", "status": "sent"}',
            "invalid_frame",
        ),
        (
            '{"type": "sms_report", "message_id": "0b9e4c1e-2f0a-4c49-9a43-1d7b2f3c4d5e", "status": "read"}',
            "invalid_frame",
        ),
        ('{"type": "sms_incoming", "body": "Hola"}', "invalid_frame"),
    ],
)
async def test_malformed_frame_gets_error_and_socket_works(
    hub_url: str, session_factory: Sessions, raw: str, code: str
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await socket.send(raw)
        error = await receive(socket)
        pong = await request(socket, {"type": "ping"})

    assert error["type"] == "error"
    assert error["error"] == code
    assert error["message"]
    assert pong["type"] == "pong"


async def test_error_echoes_request_id(hub_url: str, session_factory: Sessions) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        error = await request(socket, {"type": "sms_report", "status": "sent"})

    assert error["type"] == "error"
    assert error["error"] == "invalid_frame"
    assert "message_id" in error["message"]


async def test_binary_frame_gets_error(hub_url: str, session_factory: Sessions) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await socket.send(b'{"type": "ping"}')
        error = await receive(socket)
        pong = await request(socket, {"type": "ping"})

    assert error["type"] == "error"
    assert error["error"] == "invalid_frame"
    assert error["reason"] == "binary_frame"
    assert "binarias" in error["message"]
    assert pong["type"] == "pong"


async def test_error_message_follows_accept_language(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(
        hub_url, device.api_key, additional_headers={"Accept-Language": "en-US"}
    ) as socket:
        await send(socket, {"type": "selfie"})
        english = await receive(socket)
    async with open_socket(hub_url, device.api_key) as socket:
        await send(socket, {"type": "selfie"})
        spanish = await receive(socket)

    assert english["message"] == "Unknown frame type: selfie"
    assert spanish["message"] == "Tipo de trama desconocido: selfie"


@pytest.mark.parametrize(
    ("raw", "reason", "spanish", "english"),
    [
        ("{not json", "not_json", "no es JSON válido", "it is not valid JSON"),
        (
            '["a", "list"]',
            "not_object",
            "una trama debe ser un objeto JSON",
            "a frame must be a JSON object",
        ),
        ('{"no_type": 1}', "missing_type", "falta el campo 'type'", "is missing"),
        (
            '{"type": "ping", "request_id": "a\\u0000b"}',
            "nul_character",
            "carácter NUL",
            "NUL character",
        ),
        (
            '{"type": "register", "protocol_version": 99999999999}',
            "number_out_of_range",
            "entre -2147483648 y 2147483647",
            "between -2147483648 and 2147483647",
        ),
        (
            '{"type": "sms_incoming", "body": "Hola", "from": "' + "7" * 40 + '"}',
            "sender_length",
            "'from' debe tener de 1 a 32 caracteres",
            "'from' must be 1 to 32 characters",
        ),
    ],
)
async def test_invalid_frame_reason_localized(
    hub_url: str,
    session_factory: Sessions,
    raw: str,
    reason: str,
    spanish: str,
    english: str,
) -> None:
    device = await create_device(session_factory)
    english_headers = {"Accept-Language": "en"}

    async with open_socket(hub_url, device.api_key) as socket:
        await socket.send(raw)
        in_spanish = await receive(socket)
    async with open_socket(
        hub_url, device.api_key, additional_headers=english_headers
    ) as socket:
        await socket.send(raw)
        in_english = await receive(socket)

    assert in_spanish["error"] == "invalid_frame"
    assert in_spanish["reason"] == reason
    assert in_spanish["message"].startswith("Trama no válida: ")
    assert spanish in in_spanish["message"]
    assert in_english["reason"] == reason
    assert in_english["message"].startswith("Invalid frame: ")
    assert english in in_english["message"]


@pytest.mark.parametrize("number", ["9" * 4000, "1e309"], ids=["digits", "1e309"])
async def test_huge_number_out_of_range_named(
    hub_url: str, session_factory: Sessions, number: str
) -> None:
    device = await create_device(session_factory)
    raw = '{"type": "register", "request_id": "r1", "protocol_version": ' + number + "}"

    async with open_socket(hub_url, device.api_key) as socket:
        await socket.send(raw)
        answer = await receive(socket)

    assert answer["error"] == "invalid_frame"
    assert answer["reason"] == "number_out_of_range"
    assert answer["request_id"] == "r1"


async def test_invalid_fields_listed_and_localized(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    frame = {"type": "sms_report", "message_id": "nope", "status": "sent"}

    async with open_socket(hub_url, device.api_key) as socket:
        in_spanish = await request(socket, frame)
    async with open_socket(
        hub_url, device.api_key, additional_headers={"Accept-Language": "en"}
    ) as socket:
        in_english = await request(socket, frame)

    assert in_spanish["reason"] == "invalid_fields"
    assert in_spanish["fields"] == [{"field": "message_id", "type": "uuid_parsing"}]
    assert in_spanish["message"].startswith(
        "Trama no válida: message_id: Debe ser un UUID"
    )
    assert in_english["fields"] == in_spanish["fields"]
    assert in_english["message"].startswith("Invalid frame: message_id: Must be a UUID")


@pytest.mark.parametrize(
    ("name", "error_type", "spanish", "english"),
    [
        (
            "\u200b\u2060",
            "string_blank",
            "Debe contener al menos un carácter visible",
            "Must contain at least one visible character",
        ),
        (
            "Pixel\x1b[2J",
            "string_contains_control",
            "No puede contener caracteres de control",
            "Must not contain control characters",
        ),
        (
            "Pixel\u202e8",
            "string_contains_control",
            "No puede contener caracteres de control",
            "Must not contain control characters",
        ),
    ],
)
async def test_register_rejects_invisible_or_control_name(
    hub_url: str,
    session_factory: Sessions,
    name: str,
    error_type: str,
    spanish: str,
    english: str,
) -> None:
    device = await create_device(session_factory)
    frame = {"type": "register", "device_name": name}

    async with open_socket(hub_url, device.api_key) as socket:
        in_spanish = await request(socket, frame)
    async with open_socket(
        hub_url, device.api_key, additional_headers={"Accept-Language": "en"}
    ) as socket:
        in_english = await request(socket, frame)
    row = await load_device(session_factory, device.device_id)

    assert in_spanish["error"] == "invalid_frame"
    assert in_spanish["reason"] == "invalid_fields"
    assert in_spanish["fields"] == [{"field": "device_name", "type": error_type}]
    assert in_spanish["message"].startswith(f"Trama no válida: device_name: {spanish}")
    assert in_english["fields"] == in_spanish["fields"]
    assert in_english["message"].startswith(f"Invalid frame: device_name: {english}")
    assert row.name == "Test phone"


async def test_register_blank_name_keeps_stored_name(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        ack = await request(socket, {"type": "register", "device_name": "  "})

    assert ack["type"] == "ack"
    assert ack["name"] == "Test phone"


async def test_too_many_errors_close_connection(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        for _ in range(MAX_CONSECUTIVE_ERRORS):
            await socket.send("garbage")
        code, reason = await wait_closed(socket)

    assert code == protocol.CLOSE_TOO_MANY_ERRORS
    assert "invalid frames" in reason


async def test_valid_frame_resets_error_count(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        for _ in range(3):
            for _ in range(MAX_CONSECUTIVE_ERRORS - 1):
                await socket.send("garbage")
            pong = await request(socket, {"type": "ping"})
            assert pong["type"] == "pong"


async def test_oversize_frame_closes_with_1009(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    body = "x" * (64 * 1024 + 1)

    async with open_socket(hub_url, device.api_key) as socket:
        await send(
            socket, {"type": "sms_incoming", "from": "+34611223344", "body": body}
        )
        code, _ = await wait_closed(socket)

    assert code == protocol.CLOSE_MESSAGE_TOO_BIG
