"""Presence of devices: which connection of a device is the newest, and online/offline.

Every new connection SETs `keys.device_connection(device_id)` to its id, so the last SET
names the connection that wins, on whichever hub it is. Refreshing and releasing the key
compare its value inside a Lua script, so an older connection never extends or deletes
the key of a newer one. A missing key (expired, or lost with Redis) counts as free.

Heartbeats and offline marks in Postgres go through one PresenceWriter per hub, which
writes everything queued so far in one statement. A single write costs the same as
before, and 10,000 phones that reconnect or drop at once cost a few dozen statements
instead of 10,000.
"""

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common import queues
from mensajero_common.db import session_scope
from mensajero_common.keys import RedisKeys
from mensajero_hub.core import repository

log = structlog.get_logger(__name__)

# Devices per statement; a bound on the size of one transaction and one Redis pipeline.
MAX_BATCH_SIZE = 500

# KEYS[1] = connection key, ARGV[1] = connection id, ARGV[2] = TTL in seconds.
_REFRESH_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] or not current then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
    return 1
end
return 0
"""

# KEYS[1] = connection key, ARGV[1] = connection id.
_RELEASE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] or not current then
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
"""


class ConnectionKeys:
    def __init__(self, redis: Redis, keys: RedisKeys, ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self.ttl_s = ttl_s
        self._refresh = redis.register_script(_REFRESH_SCRIPT)
        self._release = redis.register_script(_RELEASE_SCRIPT)

    async def claim(self, device_id: uuid.UUID, connection_id: str) -> None:
        """Make this connection the device's newest, whatever connection held the key."""
        await self._redis.set(
            self._keys.device_connection(device_id), connection_id, ex=self.ttl_s
        )

    async def refresh(self, device_id: uuid.UUID, connection_id: str) -> bool:
        """Extend the key's TTL; return False when the key names a newer connection."""
        result = await self._refresh(
            keys=[self._keys.device_connection(device_id)],
            args=[connection_id, self.ttl_s],
        )
        return bool(result)

    async def release(self, device_id: uuid.UUID, connection_id: str) -> bool:
        """Delete the key; return False, keeping it, when it names a newer connection."""
        result = await self._release(
            keys=[self._keys.device_connection(device_id)], args=[connection_id]
        )
        return bool(result)

    async def release_many(
        self, connections: list[tuple[uuid.UUID, str]]
    ) -> list[bool]:
        """Release several keys in one round trip; return `release`'s result for each."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_id, connection_id in connections:
                await self._release(
                    keys=[self._keys.device_connection(device_id)],
                    args=[connection_id],
                    client=pipe,
                )
            results = await pipe.execute()
        return [bool(result) for result in results]

    async def current(self, device_id: uuid.UUID) -> str | None:
        value = await self._redis.get(self._keys.device_connection(device_id))
        return None if value is None else value.decode()


@dataclass
class _Write:
    device_id: uuid.UUID
    future: "asyncio.Future[object]"
    # Set for an offline mark: the closing connection and the last heartbeat it wrote.
    connection_id: str | None = None
    heartbeat_at: datetime | None = None
    offline: bool = False


@dataclass
class PresenceWriter:
    sessions: async_sessionmaker[AsyncSession]
    redis: Redis
    keys: RedisKeys
    connection_keys: ConnectionKeys
    _pending: list[_Write] = field(default_factory=list)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _worker: "asyncio.Task[None] | None" = None
    _stopping: bool = False

    def start(self) -> None:
        self._worker = asyncio.create_task(
            self._write_forever(), name="presence-writer"
        )

    async def stop(self) -> None:
        """Write what is still queued, then stop."""
        self._stopping = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker

    async def write_heartbeat(self, device_id: uuid.UUID) -> datetime | None:
        """Mark the device online with a fresh heartbeat; return the heartbeat written.

        Returns None when the device no longer exists.
        """
        result = await self._submit(_Write(device_id, self._new_future()))
        return result if isinstance(result, datetime) else None

    async def mark_offline(
        self,
        device_id: uuid.UUID,
        connection_id: str,
        heartbeat_at: datetime | None,
    ) -> bool:
        """Release the connection key and mark the device offline, unless a newer
        connection took over; return whether the device went offline."""
        write = _Write(
            device_id,
            self._new_future(),
            connection_id=connection_id,
            heartbeat_at=heartbeat_at,
            offline=True,
        )
        return bool(await self._submit(write))

    def _new_future(self) -> "asyncio.Future[object]":
        return asyncio.get_running_loop().create_future()

    async def _submit(self, write: _Write) -> object:
        if self._worker is None or self._worker.done():
            raise RuntimeError("the presence writer is not running")
        self._pending.append(write)
        self._wakeup.set()
        return await write.future

    async def _write_forever(self) -> None:
        while True:
            if not self._pending:
                if self._stopping:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue

            batch = self._pending[:MAX_BATCH_SIZE]
            del self._pending[:MAX_BATCH_SIZE]
            heartbeats = [write for write in batch if not write.offline]
            offline = [write for write in batch if write.offline]
            # Heartbeats first: an offline mark of an older connection then compares
            # against the heartbeat a newer connection of the same device just wrote.
            await self._run(self._write_heartbeats, heartbeats)
            await self._run(self._mark_offline, offline)

    async def _run(
        self,
        step: Callable[[list[_Write]], Awaitable[list[object]]],
        writes: list[_Write],
    ) -> None:
        if not writes:
            return
        try:
            results = await step(writes)
        except Exception as error:
            log.exception("presence write failed", count=len(writes))
            for write in writes:
                if not write.future.done():
                    write.future.set_exception(error)
            return
        for write, result in zip(writes, results, strict=True):
            if not write.future.done():
                write.future.set_result(result)

    async def _write_heartbeats(self, writes: list[_Write]) -> list[object]:
        async with session_scope(self.sessions) as db:
            written = await repository.write_heartbeats(
                db, {write.device_id for write in writes}
            )
        return [written.get(write.device_id) for write in writes]

    async def _mark_offline(self, writes: list[_Write]) -> list[object]:
        released = await self.connection_keys.release_many(
            [(write.device_id, write.connection_id or "") for write in writes]
        )
        closing: list[tuple[uuid.UUID, datetime]] = []
        for write, is_released in zip(writes, released, strict=True):
            if is_released and write.heartbeat_at is not None:
                closing.append((write.device_id, write.heartbeat_at))

        went_offline: set[tuple[uuid.UUID, datetime]] = set()
        if closing:
            async with session_scope(self.sessions) as db:
                went_offline = await repository.mark_offline(db, closing)
        if went_offline:
            await queues.signal_device_events(
                self.redis,
                self.keys,
                {device_id for device_id, _ in went_offline},
                "offline",
            )
        return [
            (write.device_id, write.heartbeat_at) in went_offline for write in writes
        ]
