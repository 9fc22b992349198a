"""Presence of devices: which connection of a device is the newest, and online/offline.

Every new connection SETs `keys.device_connection(device_id)` to its id, so the last SET
names the connection that wins, on whichever hub it is. Refreshing and releasing the key
compare its value inside a Lua script, so an older connection never extends or deletes
the key of a newer one. A missing key (expired, or lost with Redis) counts as free.

Heartbeats, key refreshes and offline marks go through one PresenceWriter per hub, which
writes everything queued so far with one script call in Redis and one statement in
Postgres. So 10,000 phones that ping, reconnect or drop at once cost a few dozen round
trips instead of 10,000.
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
# How long the writer waits for more writes before it writes a batch smaller than
# MAX_BATCH_SIZE. Every batch costs a Redis call and a Postgres transaction whatever its
# size, so 833 pings per second (50,000 phones on a 60 s interval) cost at most 20
# batches per second instead of one per ping. A new connection's first heartbeat, and
# with it the first push of its tasks, waits this long too.
BATCH_LINGER_S = 0.05

# KEYS = connection keys, ARGV[1] = TTL in seconds, ARGV[i + 1] = connection id of KEYS[i].
# Returns 1 for each key refreshed and 0 for each key that names another connection.
_REFRESH_MANY_SCRIPT = """
local refreshed = {}
for i, key in ipairs(KEYS) do
    local current = redis.call('GET', key)
    if current == ARGV[i + 1] or not current then
        redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
        refreshed[i] = 1
    else
        refreshed[i] = 0
    end
end
return refreshed
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
        self._refresh_many = redis.register_script(_REFRESH_MANY_SCRIPT)
        self._release = redis.register_script(_RELEASE_SCRIPT)

    async def claim(self, device_id: uuid.UUID, connection_id: str) -> None:
        """Make this connection the device's newest, whatever connection held the key."""
        await self._redis.set(
            self._keys.device_connection(device_id), connection_id, ex=self.ttl_s
        )

    async def refresh_many(
        self, connections: list[tuple[uuid.UUID, str]]
    ) -> list[bool]:
        """Extend each connection's key by the TTL, all in one script call.

        Returns, for each connection, False when its key names a newer connection (that
        key is left as it is), else True.
        """
        if not connections:
            return []
        result = await self._refresh_many(
            keys=[
                self._keys.device_connection(device_id) for device_id, _ in connections
            ],
            args=[self.ttl_s, *(connection_id for _, connection_id in connections)],
        )
        return [bool(refreshed) for refreshed in result]

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


@dataclass(frozen=True, slots=True)
class Touch:
    """The outcome of a live connection's periodic heartbeat."""

    # False when the device's connection key names a newer connection, which then keeps
    # the key, and no heartbeat was written.
    newest: bool
    # The heartbeat written; None when it was not written or the device no longer exists.
    heartbeat_at: datetime | None


@dataclass
class _Write:
    device_id: uuid.UUID
    future: "asyncio.Future[object]"
    # The writing connection: set for a touch and for an offline mark.
    connection_id: str | None = None
    # A touch refreshes the connection key before its heartbeat is written; `newest`
    # is the refresh's result.
    touch: bool = False
    newest: bool = False
    # Set for an offline mark: the last heartbeat the closing connection wrote.
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

    async def touch(self, device_id: uuid.UUID, connection_id: str) -> Touch:
        """Refresh the connection's key and, if it is still the newest, its heartbeat.

        Raises the Redis or Postgres error when a write failed.
        """
        write = _Write(
            device_id, self._new_future(), connection_id=connection_id, touch=True
        )
        result = await self._submit(write)
        if not isinstance(result, Touch):
            raise TypeError(f"expected a Touch, got {result!r}")
        return result

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

            if len(self._pending) < MAX_BATCH_SIZE and not self._stopping:
                await asyncio.sleep(BATCH_LINGER_S)

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
            if write.future.done():
                continue
            if isinstance(result, BaseException):
                write.future.set_exception(result)
            else:
                write.future.set_result(result)

    async def _write_heartbeats(self, writes: list[_Write]) -> list[object]:
        """Refresh the keys of the touches, then write the heartbeats still wanted.

        A touch whose key names a newer connection writes no heartbeat. When Redis fails,
        only the touches fail, and the heartbeats of new connections are still written.
        """
        touches = [write for write in writes if write.touch]
        refresh_error: Exception | None = None
        try:
            refreshed = await self.connection_keys.refresh_many(
                [(write.device_id, write.connection_id or "") for write in touches]
            )
        except Exception as error:
            log.exception("connection key refresh failed", count=len(touches))
            refresh_error = error
        else:
            for write, is_newest in zip(touches, refreshed, strict=True):
                write.newest = is_newest

        device_ids = {
            write.device_id for write in writes if write.newest or not write.touch
        }
        written: dict[uuid.UUID, datetime] = {}
        if device_ids:
            async with session_scope(self.sessions) as db:
                written = await repository.write_heartbeats(db, device_ids)

        results: list[object] = []
        for write in writes:
            if not write.touch:
                results.append(written.get(write.device_id))
            elif refresh_error is not None:
                results.append(refresh_error)
            elif write.newest:
                results.append(Touch(True, written.get(write.device_id)))
            else:
                results.append(Touch(False, None))
        return results

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
