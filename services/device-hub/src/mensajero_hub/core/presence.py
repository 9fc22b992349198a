"""Presence of devices: which connection of a device is the newest, and online/offline.

Every new connection SETs `keys.device_connection(device_id)` to its id, so the last SET
names the connection that wins, on whichever hub it is. Refreshing and releasing the key
compare its value inside a Lua script, so an older connection never extends or deletes
the key of a newer one. A missing key (expired, or lost with Redis) counts as free.

New connections, heartbeats and offline marks go through one PresenceWriter per hub,
which writes everything queued so far together: one Redis round trip per step, one
statement for all heartbeats and one for all offline marks. So 10,000 phones that ping,
reconnect or drop at once cost a few dozen round trips instead of 10,000.
"""

import asyncio
import enum
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common import queues
from mensajero_common.db import session_scope
from mensajero_common.keys import CHANNEL_CONNECTED_PREFIX, RedisKeys
from mensajero_hub.core import repository

log = structlog.get_logger(__name__)

# Devices per statement; a bound on the size of one transaction and one Redis pipeline.
MAX_BATCH_SIZE = 500
# How long the writer waits for more writes before it writes a batch smaller than
# MAX_BATCH_SIZE. Every batch costs Redis round trips and a Postgres transaction whatever
# its size, so 833 pings per second (50,000 phones on a 60 s interval) cost at most 20
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

    async def claim_many(self, connections: list[tuple[uuid.UUID, str]]) -> None:
        """Make each connection its device's newest, whatever connection held the key,
        and tell the device's older connections, on any hub, to close, in one round trip.

        A device listed twice ends with the key of its last connection in the list.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_id, connection_id in connections:
                pipe.set(
                    self._keys.device_connection(device_id),
                    connection_id,
                    ex=self.ttl_s,
                )
                pipe.publish(
                    self._keys.device_channel(device_id),
                    f"{CHANNEL_CONNECTED_PREFIX}{connection_id}",
                )
            await pipe.execute()

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
    # "device_inactive" or "user_inactive" when the heartbeat found the device or its
    # owner disabled.
    disabled_reason: str | None = None


class _Kind(enum.Enum):
    # A new connection: claim the key, announce it, write the heartbeat, signal online.
    OPEN = "open"
    # A live connection's heartbeat: refresh the key, then write the heartbeat.
    TOUCH = "touch"
    # A closed connection: release the key and mark the device offline.
    OFFLINE = "offline"


@dataclass(slots=True)
class _Write:
    kind: _Kind
    device_id: uuid.UUID
    connection_id: str
    future: "asyncio.Future[object]"
    # For OFFLINE: the last heartbeat the closing connection wrote.
    heartbeat_at: datetime | None = None
    # Whether the key still names this connection: set by the claim of an OPEN and
    # by the refresh of a TOUCH.
    newest: bool = False


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

    async def open_connection(
        self, device_id: uuid.UUID, connection_id: str
    ) -> datetime | None:
        """Make the connection the device's newest, tell its older connections to close,
        mark the device online and tell the dispatcher; return the heartbeat written.

        Returns None when the device no longer exists. Raises the Redis or Postgres
        error when a write failed.
        """
        write = _Write(_Kind.OPEN, device_id, connection_id, self._new_future())
        result = await self._submit(write)
        return result if isinstance(result, datetime) else None

    async def touch(self, device_id: uuid.UUID, connection_id: str) -> Touch:
        """Refresh the connection's key and, if it is still the newest, its heartbeat.

        Raises the Redis or Postgres error when a write failed.
        """
        write = _Write(_Kind.TOUCH, device_id, connection_id, self._new_future())
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
            _Kind.OFFLINE, device_id, connection_id, self._new_future(), heartbeat_at
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
            heartbeats = [write for write in batch if write.kind is not _Kind.OFFLINE]
            offline = [write for write in batch if write.kind is _Kind.OFFLINE]
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
        """Claim the keys of new connections and refresh those of live ones, write the
        heartbeats of the connections that are the newest, then signal the new ones.

        Claims go first, so a live connection of the same device in this batch finds the
        new connection's key and closes. When Redis fails, only the writes of the failed
        step fail.
        """
        opens = [write for write in writes if write.kind is _Kind.OPEN]
        touches = [write for write in writes if write.kind is _Kind.TOUCH]
        claim_error = await self._claim(opens)
        refresh_error = await self._refresh(touches)

        written: dict[uuid.UUID, repository.WrittenHeartbeat] = {}
        device_ids = {write.device_id for write in writes if write.newest}
        if device_ids:
            async with self.sessions() as db:
                written = await repository.write_heartbeats(db, device_ids)

        signal_error = await self._signal_online(
            {write.device_id for write in opens if write.device_id in written}
        )

        results: list[object] = []
        for write in writes:
            heartbeat = written.get(write.device_id) if write.newest else None
            heartbeat_at = None if heartbeat is None else heartbeat.heartbeat_at
            if write.kind is _Kind.TOUCH:
                reason = None if heartbeat is None else heartbeat.disabled_reason
                results.append(
                    refresh_error or Touch(write.newest, heartbeat_at, reason)
                )
            elif claim_error is not None:
                results.append(claim_error)
            elif heartbeat_at is not None and signal_error is not None:
                results.append(signal_error)
            else:
                results.append(heartbeat_at)
        return results

    async def _claim(self, opens: list[_Write]) -> Exception | None:
        """Claim the keys of new connections; return the error if Redis failed."""
        if not opens:
            return None
        try:
            await self.connection_keys.claim_many(
                [(write.device_id, write.connection_id) for write in opens]
            )
        except Exception as error:
            log.exception("connection key claim failed", count=len(opens))
            return error
        for write in opens:
            write.newest = True
        return None

    async def _refresh(self, touches: list[_Write]) -> Exception | None:
        """Refresh the keys of live connections; return the error if Redis failed."""
        if not touches:
            return None
        try:
            refreshed = await self.connection_keys.refresh_many(
                [(write.device_id, write.connection_id) for write in touches]
            )
        except Exception as error:
            log.exception("connection key refresh failed", count=len(touches))
            return error
        for write, is_newest in zip(touches, refreshed, strict=True):
            write.newest = is_newest
        return None

    async def _signal_online(self, device_ids: set[uuid.UUID]) -> Exception | None:
        """Tell the dispatcher that these devices came online; return the error if any."""
        if not device_ids:
            return None
        try:
            await queues.signal_device_events(
                self.redis, self.keys, device_ids, "online"
            )
        except Exception as error:
            log.exception("online signal failed", count=len(device_ids))
            return error
        return None

    async def _mark_offline(self, writes: list[_Write]) -> list[object]:
        released = await self.connection_keys.release_many(
            [(write.device_id, write.connection_id) for write in writes]
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
