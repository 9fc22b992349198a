import uuid
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis

from mensajero_common import queues
from mensajero_common.keys import RedisKeys

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


async def _queued(
    redis: Redis, keys: RedisKeys, device_id: uuid.UUID
) -> list[tuple[uuid.UUID, int]]:
    tasks = await queues.read_device_tasks(redis, keys, device_id)
    return [(message_id, task["attempt"]) for _, message_id, task in tasks]


async def test_remove_device_tasks_up_to_attempt(
    redis: Redis, redis_keys: RedisKeys
) -> None:
    phone, other_phone = uuid.uuid4(), uuid.uuid4()
    retried, cancelled, untouched, elsewhere = (uuid.uuid4() for _ in range(4))
    for device_id, message_id, attempt in [
        (phone, retried, 1),
        (phone, retried, 2),
        (phone, cancelled, 1),
        (phone, untouched, 1),
        (other_phone, elsewhere, 3),
    ]:
        task = {"message_id": str(message_id), "attempt": attempt}
        await queues.push_device_task(redis, redis_keys, device_id, message_id, task)

    removed = await queues.remove_device_tasks(
        redis,
        redis_keys,
        [(phone, retried, 1), (phone, cancelled, 1), (other_phone, elsewhere, 3)],
    )
    nothing = await queues.remove_device_tasks(redis, redis_keys, [])

    assert removed == 3
    assert nothing == 0
    # The entry of the later attempt stays, as with remove_device_task.
    assert await _queued(redis, redis_keys, phone) == [(retried, 2), (untouched, 1)]
    assert await _queued(redis, redis_keys, other_phone) == []
