import uuid
from datetime import UTC, datetime, timedelta

import pytest

from mensajero_common import queues

CREATED_AT = datetime(2026, 12, 5, 9, 30, 0, 123456, tzinfo=UTC)


def _message(**changes: object) -> queues.NewMessage:
    fields: dict[str, object] = {
        "id": uuid.uuid4(),
        "user_id": uuid.uuid4(),
        "requested_device_id": uuid.uuid4(),
        "to_number": "+34600000001",
        "body": "Hola 👋\nsegunda línea",
        "segments": 1,
        "encoding": "ucs2",
        "created_at": CREATED_AT,
        "expires_at": CREATED_AT + timedelta(hours=1),
        **changes,
    }
    return queues.NewMessage(**fields)  # type: ignore[arg-type]


def _entry(message: queues.NewMessage) -> dict[bytes, bytes]:
    """The fields as Redis returns them."""
    return {
        str(name).encode(): str(value).encode()
        for name, value in queues.new_message_fields(message).items()
    }


@pytest.mark.parametrize(
    "message",
    [_message(), _message(requested_device_id=None, expires_at=None, body="")],
)
def test_new_message_entry_round_trip(message: queues.NewMessage) -> None:
    assert queues.read_new_message(_entry(message)) == message


def test_entry_with_only_the_id_carries_no_message() -> None:
    assert queues.read_new_message({b"message_id": str(uuid.uuid4()).encode()}) is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"created_at", b"yesterday"),
        (b"segments", b"two"),
        (b"user_id", b"not-a-uuid"),
        (b"body", b"\xff\xfe"),
        (b"expires_at", b"2026-13-01T00:00:00+00:00"),
    ],
)
def test_malformed_entry_carries_no_message(name: bytes, value: bytes) -> None:
    fields = _entry(_message())
    fields[name] = value
    assert queues.read_new_message(fields) is None
