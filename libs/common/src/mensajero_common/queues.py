"""Redis stream and channel operations that more than one service performs.

Postgres holds every message; these streams only carry work. An entry lost with Redis is
found again by the dispatcher's sweep over Postgres.
"""

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.typing import EncodableT

from mensajero_common import jsonutil
from mensajero_common.keys import RedisKeys

# Approximate cap on the shared streams: older entries are trimmed, and the Postgres sweep
# re-signals any message whose entry was trimmed before it was read.
SHARED_STREAM_MAXLEN = 1_000_000
# Lower for the new-message stream, whose entries of single sends carry the whole message
# (about 400 bytes with a 160-character body), so that a dispatcher stopped for hours
# does not fill Redis. The pending sweep assigns the messages of trimmed entries.
NEW_MESSAGES_STREAM_MAXLEN = 100_000


@dataclass(frozen=True)
class NewMessage:
    """A new outgoing message as its stream entry carries it, so that the dispatcher can
    assign it without reading it from Postgres first."""

    id: uuid.UUID
    user_id: uuid.UUID
    requested_device_id: uuid.UUID | None
    to_number: str
    body: str
    segments: int
    encoding: str
    created_at: datetime
    expires_at: datetime | None


def new_message_fields(message: NewMessage) -> dict[EncodableT, EncodableT]:
    """Return the fields of the new-message entry that carries `message`."""
    return {
        "message_id": str(message.id),
        "user_id": str(message.user_id),
        "requested_device_id": str(message.requested_device_id or ""),
        "to": message.to_number,
        "body": message.body,
        "segments": message.segments,
        "encoding": message.encoding,
        "created_at": message.created_at.isoformat(),
        "expires_at": message.expires_at.isoformat() if message.expires_at else "",
    }


def read_new_message(fields: Mapping[bytes, bytes]) -> NewMessage | None:
    """Return the message that a new-message entry carries, or None when the entry has
    only the message's id (from a bulk send or a sweep) or does not parse."""
    try:
        requested = fields[b"requested_device_id"]
        expires_at = fields[b"expires_at"]
        return NewMessage(
            id=uuid.UUID(fields[b"message_id"].decode()),
            user_id=uuid.UUID(fields[b"user_id"].decode()),
            requested_device_id=uuid.UUID(requested.decode()) if requested else None,
            to_number=fields[b"to"].decode(),
            body=fields[b"body"].decode(),
            segments=int(fields[b"segments"]),
            encoding=fields[b"encoding"].decode(),
            created_at=datetime.fromisoformat(fields[b"created_at"].decode()),
            expires_at=datetime.fromisoformat(expires_at.decode())
            if expires_at
            else None,
        )
    except (KeyError, ValueError):
        # UnicodeDecodeError is a ValueError.
        return None


async def signal_new_message(
    redis: Redis, keys: RedisKeys, message: NewMessage
) -> None:
    """Tell the dispatcher that this committed message waits for assignment, with the
    fields that the assignment and the task need."""
    await redis.xadd(
        keys.new_messages_stream,
        new_message_fields(message),
        maxlen=NEW_MESSAGES_STREAM_MAXLEN,
        approximate=True,
    )


# One XADD per message id, done by Redis: a pipeline of 1000 XADDs cost a fifth of a
# 1000-recipient bulk send's CPU in redis-py alone, packing each command.
_SIGNAL_NEW_MESSAGES_SCRIPT = """
for index = 2, #ARGV do
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'message_id', ARGV[index])
end
return #ARGV - 1
"""
# Message ids per script call, so that Redis is not held for long by one call.
_SIGNAL_BATCH = 1000


async def signal_new_messages(
    redis: Redis, keys: RedisKeys, message_ids: Iterable[uuid.UUID]
) -> None:
    """Tell the dispatcher that these committed messages wait for assignment."""
    ids = [str(message_id) for message_id in message_ids]
    if len(ids) == 1:
        await redis.xadd(
            keys.new_messages_stream,
            {"message_id": ids[0]},
            maxlen=NEW_MESSAGES_STREAM_MAXLEN,
            approximate=True,
        )
        return
    script = redis.register_script(_SIGNAL_NEW_MESSAGES_SCRIPT)
    for start in range(0, len(ids), _SIGNAL_BATCH):
        await script(
            keys=[keys.new_messages_stream],
            args=[NEW_MESSAGES_STREAM_MAXLEN, *ids[start : start + _SIGNAL_BATCH]],
        )


# KEYS[2i - 1] = stream of task i, KEYS[2i] = its device's channel; ARGV[3i - 2],
# ARGV[3i - 1], ARGV[3i] = its message id, task JSON and attempt ("" for none). Appends
# each task and publishes it with the id of the entry before it (see
# CHANNEL_TASK_PREFIX), in one script so that no entry can come in between. Returns the
# stream ids.
_PUSH_DEVICE_TASKS_SCRIPT = """
local ids = {}
for i = 1, #KEYS / 2 do
    local stream, channel = KEYS[2 * i - 1], KEYS[2 * i]
    local message_id, task, attempt = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
    local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    local previous = '-'
    if #last > 0 then
        previous = last[1][1]
    end
    local id
    if attempt == '' then
        id = redis.call('XADD', stream, '*', 'message_id', message_id, 'task', task)
    else
        id = redis.call(
            'XADD', stream, '*', 'message_id', message_id, 'task', task,
            'attempt', attempt
        )
    end
    redis.call(
        'PUBLISH', channel,
        'task ' .. previous .. ' ' .. id .. ' ' .. message_id .. ' ' .. task
    )
    ids[i] = id
end
return ids
"""
# Tasks per script call, so that Redis is not held for long by one call.
_PUSH_BATCH = 500


async def push_device_task(
    redis: Redis,
    keys: RedisKeys,
    device_id: uuid.UUID,
    message_id: uuid.UUID,
    task: Mapping[str, Any],
) -> bytes:
    """Append a task to the device's stream and publish it to the hub that has the
    device's connection; return its stream id.

    The entry carries the task's `attempt`, when it has one, so that removing the entries
    of a finished attempt never removes those of a newer attempt. The stream stays the
    source of truth: a hub that misses the message, or cannot use it, reads the stream.
    """
    (stream_id,) = await push_device_tasks(redis, keys, [(device_id, message_id, task)])
    return stream_id


async def push_device_tasks(
    redis: Redis,
    keys: RedisKeys,
    tasks: Iterable[tuple[uuid.UUID, uuid.UUID, Mapping[str, Any]]],
) -> list[bytes]:
    """Append (device id, message id, task) tasks like push_device_task, in one round
    trip per 500 tasks; return their stream ids in order."""
    script = redis.register_script(_PUSH_DEVICE_TASKS_SCRIPT)
    pending = list(tasks)
    stream_ids: list[bytes] = []
    for start in range(0, len(pending), _PUSH_BATCH):
        script_keys: list[str] = []
        script_args: list[EncodableT] = []
        for device_id, message_id, task in pending[start : start + _PUSH_BATCH]:
            script_keys.append(keys.device_tasks_stream(device_id))
            script_keys.append(keys.device_channel(device_id))
            attempt = task.get("attempt")
            script_args.append(str(message_id))
            script_args.append(jsonutil.dumps(dict(task)))
            script_args.append("" if attempt is None else str(attempt))
        stream_ids.extend(await script(keys=script_keys, args=script_args))
    return stream_ids


async def read_device_tasks(
    redis: Redis,
    keys: RedisKeys,
    device_id: uuid.UUID,
    after: bytes | str = "-",
    count: int = 100,
) -> list[tuple[bytes, uuid.UUID, dict[str, Any]]]:
    """Return up to `count` tasks of the device queued after the stream id `after`."""
    start = (
        "-"
        if after == "-"
        else b"(" + (after if isinstance(after, bytes) else after.encode())
    )
    entries = await redis.xrange(
        keys.device_tasks_stream(device_id), min=start, max="+", count=count
    )
    tasks = []
    for stream_id, fields in entries:
        tasks.append(
            (
                stream_id,
                uuid.UUID(fields[b"message_id"].decode()),
                jsonutil.loads(fields[b"task"]),
            )
        )
    return tasks


def _entry_attempt(fields: Mapping[bytes, bytes]) -> int | None:
    raw = fields.get(b"attempt")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def select_task_entries(
    entries: Iterable[tuple[bytes, Mapping[bytes, bytes]]],
    message_id: uuid.UUID,
    *,
    up_to_attempt: int | None = None,
) -> list[bytes]:
    """Return the stream ids of the entries of `message_id` among a device's entries.

    With `up_to_attempt`, entries of a later attempt are left out: a retry may have
    queued the message again on the same device before the earlier attempt's entry was
    removed.
    """
    wanted = str(message_id).encode()
    return [
        stream_id
        for stream_id, fields in entries
        if fields.get(b"message_id") == wanted and _within(fields, up_to_attempt)
    ]


def _within(fields: Mapping[bytes, bytes], up_to_attempt: int | None) -> bool:
    """Tell whether an entry's attempt is at most `up_to_attempt` (any, when None).

    An entry without a readable attempt counts as within.
    """
    attempt = _entry_attempt(fields)
    return up_to_attempt is None or attempt is None or attempt <= up_to_attempt


async def remove_device_task(
    redis: Redis,
    keys: RedisKeys,
    device_id: uuid.UUID,
    message_id: uuid.UUID,
    *,
    up_to_attempt: int | None = None,
) -> int:
    """Delete the entries of `message_id` from the device's stream; return how many.

    With `up_to_attempt`, entries of a later attempt stay (see select_task_entries).
    """
    stream = keys.device_tasks_stream(device_id)
    # The stream contains only tasks the phone has not finished, so a scan stays short.
    entries = await redis.xrange(stream, min="-", max="+")
    stale = select_task_entries(entries, message_id, up_to_attempt=up_to_attempt)
    if not stale:
        return 0
    return int(await redis.xdel(stream, *stale))


async def remove_device_tasks(
    redis: Redis,
    keys: RedisKeys,
    tasks: Iterable[tuple[uuid.UUID, uuid.UUID, int]],
) -> int:
    """Delete the entries of each (device id, message id, attempt) up to that attempt,
    like remove_device_task, and return how many were deleted.

    Two round trips serve every device: one reads the streams, one deletes the entries.
    """
    # The attempt up to which each message's entries go, by device and message id.
    up_to_by_device: dict[uuid.UUID, dict[bytes, int]] = {}
    for device_id, message_id, attempt in tasks:
        up_to_by_device.setdefault(device_id, {})[str(message_id).encode()] = attempt
    if not up_to_by_device:
        return 0

    device_ids = list(up_to_by_device)
    async with redis.pipeline(transaction=False) as pipe:
        for device_id in device_ids:
            pipe.xrange(keys.device_tasks_stream(device_id))
        streams = await pipe.execute()

    stale_by_device: dict[uuid.UUID, list[bytes]] = {}
    for device_id, entries in zip(device_ids, streams, strict=True):
        up_to = up_to_by_device[device_id]
        stale = [
            stream_id
            for stream_id, fields in entries
            if (message := fields.get(b"message_id")) in up_to
            and _within(fields, up_to[message])
        ]
        if stale:
            stale_by_device[device_id] = stale
    if not stale_by_device:
        return 0

    async with redis.pipeline(transaction=False) as pipe:
        for device_id, stale in stale_by_device.items():
            pipe.xdel(keys.device_tasks_stream(device_id), *stale)
        counts = await pipe.execute()
    return sum(int(count) for count in counts)


async def publish_device_control(
    redis: Redis, keys: RedisKeys, device_id: uuid.UUID, message: str
) -> None:
    await redis.publish(keys.device_channel(device_id), message)


async def signal_device_event(
    redis: Redis, keys: RedisKeys, device_id: uuid.UUID, event: str
) -> None:
    """Tell the dispatcher that a device came online or went offline."""
    await redis.xadd(
        keys.device_events_stream,
        {"device_id": str(device_id), "event": event},
        maxlen=SHARED_STREAM_MAXLEN,
        approximate=True,
    )


async def signal_device_events(
    redis: Redis, keys: RedisKeys, device_ids: Iterable[uuid.UUID], event: str
) -> None:
    """Tell the dispatcher that these devices changed presence, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for device_id in device_ids:
            pipe.xadd(
                keys.device_events_stream,
                {"device_id": str(device_id), "event": event},
                maxlen=SHARED_STREAM_MAXLEN,
                approximate=True,
            )
        await pipe.execute()
