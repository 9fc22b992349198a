"""One Redis pub/sub connection per hub process for the channels of all its devices.

A channel is subscribed while at least one connection of its device is open on this hub,
so a message published for one device reaches only the hub with its connection. Redis delivers
nothing published while a channel is not subscribed yet, so `subscribe` returns only once
Redis confirmed the subscription: a caller that reads the device's task stream afterwards
misses no task (a task pushed before is in the stream, one pushed after wakes it).

When the pub/sub connection breaks, redis-py subscribes again on reconnect; messages
published in between are lost, so the router then calls `on_reconnect` and the hub makes
every connection read its stream again.
"""

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import Callable

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from mensajero_common.keys import RedisKeys

log = structlog.get_logger(__name__)

# How long `subscribe` waits for Redis to confirm before it goes on anyway. The connection
# then still gets its queued tasks from its first stream read, and only a wake can be lost.
SUBSCRIBE_CONFIRM_TIMEOUT_S = 5.0
# How long one read waits for a message; between reads redis-py sends its health checks.
READ_TIMEOUT_S = 1.0
RECONNECT_DELAY_MAX_S = 5.0


class DeviceChannelRouter:
    def __init__(
        self,
        redis: Redis,
        keys: RedisKeys,
        on_message: Callable[[uuid.UUID, bytes], None],
        on_reconnect: Callable[[], None],
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        # Serializes SUBSCRIBE and UNSUBSCRIBE writes on the shared connection.
        self._command_lock = asyncio.Lock()
        self._refcounts: dict[uuid.UUID, int] = {}
        self._devices_by_channel: dict[bytes, uuid.UUID] = {}
        # Confirmations arrive in the order the SUBSCRIBE commands were sent.
        self._confirmations: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._pubsub = self._redis.pubsub()
        await self._pubsub.connect()
        self._reader = asyncio.create_task(self._read_forever(), name="device-channels")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None

    def channel_count(self) -> int:
        return len(self._refcounts)

    async def subscribe(self, device_id: uuid.UUID) -> None:
        """Subscribe to the device's channel, or count one more user of the subscription."""
        count = self._refcounts.get(device_id, 0)
        self._refcounts[device_id] = count + 1
        if count > 0:
            return

        channel = self._keys.device_channel(device_id).encode()
        self._devices_by_channel[channel] = device_id
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(channel, deque()).append(confirmed)
        try:
            async with self._command_lock:
                await self._connected_pubsub().subscribe(channel)
        except BaseException:
            self._drop_confirmation(channel, confirmed)
            await self._drop_reference(device_id)
            raise
        try:
            async with asyncio.timeout(SUBSCRIBE_CONFIRM_TIMEOUT_S):
                await asyncio.shield(confirmed)
        except TimeoutError:
            log.warning("subscription not confirmed in time", device_id=str(device_id))

    def _drop_confirmation(
        self, channel: bytes, confirmed: asyncio.Future[None]
    ) -> None:
        """Remove the waiter of a SUBSCRIBE that failed or was cancelled.

        Left queued, it would take the confirmation of the channel's next SUBSCRIBE, so
        that caller and every later one would wait SUBSCRIBE_CONFIRM_TIMEOUT_S.

        NOTE: a SUBSCRIBE cancelled after Redis received it is still confirmed, and that
        confirmation releases the channel's next caller early, as a timeout does.
        """
        waiting = self._confirmations.get(channel)
        if waiting is None:
            return
        with contextlib.suppress(ValueError):
            waiting.remove(confirmed)
        if not waiting:
            del self._confirmations[channel]

    async def unsubscribe(self, device_id: uuid.UUID) -> None:
        """Drop one user of the device's subscription; the last one unsubscribes."""
        if device_id not in self._refcounts:
            return
        await self._drop_reference(device_id)

    async def _drop_reference(self, device_id: uuid.UUID) -> None:
        count = self._refcounts.get(device_id, 0) - 1
        if count > 0:
            self._refcounts[device_id] = count
            return

        self._refcounts.pop(device_id, None)
        channel = self._keys.device_channel(device_id).encode()
        self._devices_by_channel.pop(channel, None)
        if self._pubsub is None:
            return
        try:
            async with self._command_lock:
                await self._pubsub.unsubscribe(channel)
        except RedisError:
            # After a reconnect redis-py subscribes to what it still lists; the next
            # message on that channel finds no device and is dropped.
            log.warning("unsubscribe failed", device_id=str(device_id), exc_info=True)

    def _unsubscribe_stray(self, channel: bytes) -> None:
        """Unsubscribe a channel of no device here, which a reconnect subscribed again.

        redis-py re-subscribes on reconnect to every channel whose unsubscribe Redis had
        not confirmed yet.
        """
        if self._pubsub is None:
            return

        async def unsubscribe() -> None:
            async with self._command_lock:
                if channel in self._devices_by_channel or self._pubsub is None:
                    return
                try:
                    await self._pubsub.unsubscribe(channel)
                except RedisError:
                    log.warning("unsubscribe failed", channel=channel, exc_info=True)

        task = asyncio.create_task(unsubscribe())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _connected_pubsub(self) -> PubSub:
        if self._pubsub is None:
            raise RuntimeError("the device channel router is not started")
        return self._pubsub

    async def _read_forever(self) -> None:
        pubsub = self._connected_pubsub()
        failures = 0
        while True:
            try:
                message = await pubsub.get_message(timeout=READ_TIMEOUT_S)
            except (RedisError, OSError) as error:
                failures += 1
                delay_s = min(RECONNECT_DELAY_MAX_S, 0.1 * 2**failures)
                log.warning(
                    "device channel connection lost, reconnecting",
                    error=str(error),
                    retry_in_s=delay_s,
                )
                await asyncio.sleep(delay_s)
                continue

            if failures:
                failures = 0
                log.info("device channel connection restored")
                self._on_reconnect()
            if message is not None:
                self._handle(message)

    def _handle(self, message: dict[str, object]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if not isinstance(channel, bytes):
            return
        if kind == "subscribe":
            waiting = self._confirmations.get(channel)
            if waiting:
                future = waiting.popleft()
                if not future.done():
                    future.set_result(None)
                if not waiting:
                    del self._confirmations[channel]
            return
        if kind != "message":
            return

        device_id = self._devices_by_channel.get(channel)
        if device_id is None:
            self._unsubscribe_stray(channel)
            return
        data = message.get("data")
        if not isinstance(data, bytes):
            return
        try:
            self._on_message(device_id, data)
        except Exception:
            log.exception("handling a device channel message failed")
