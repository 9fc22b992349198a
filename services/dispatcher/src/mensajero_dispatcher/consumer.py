"""The stream consumer: new messages and device presence events, in one consumer group.

Both streams are read with one blocking XREADGROUP in the group `keys.dispatcher_group`,
each process under its own consumer name. An entry is acknowledged and deleted only after
it is handled, so the entries of a dispatcher that dies stay pending in the group, and
another dispatcher claims them once they have been idle for `claim_idle_ms`.

Each batch read is handled in a task of its own while the next read goes on, so a new
message does not wait for the round trips of the batch before it. New-message batches
run side by side, up to `max_batches_in_flight` at once. Presence events keep their
order: each batch of them starts when the one before it has finished.

Postgres stays the source of truth: an entry whose message is no longer pending is
skipped, and a message whose entry was lost is found by the pending sweep.
"""

import asyncio
import os
import socket
import uuid
from collections.abc import Sequence

import structlog
from redis.exceptions import ResponseError
from redis.typing import KeyT, StreamIdT

from mensajero_common import queues
from mensajero_common.transient import is_transient
from mensajero_dispatcher.context import DispatcherContext
from mensajero_dispatcher.devices.service import (
    handle_device_event,
    select_events_to_handle,
)
from mensajero_dispatcher.lifecycle import sleep_unless_stopped
from mensajero_dispatcher.messages.schemas import PendingMessage
from mensajero_dispatcher.messages.service import assign_messages

log = structlog.get_logger(__name__)

READ_COUNT = 100
# Batches handled at once. With a second batch in flight, a new message does not wait
# for the round trips of the batch before it. More would split a steady stream of
# messages into more and smaller batches, and a batch costs the same statements
# whatever its size.
MAX_BATCHES_IN_FLIGHT = 2
# Bounds how long a stop request waits for the blocking read to return.
READ_BLOCK_MS = 1000
# An entry delivered to a consumer and not acknowledged for this long belongs to a
# dispatcher that died (or hangs), and is claimed by another one.
CLAIM_IDLE_MS = 60_000
CLAIM_INTERVAL_S = 30.0
# Consumers with nothing pending and no read for this long are removed from the group,
# so names of old processes do not pile up.
DEAD_CONSUMER_IDLE_MS = 3_600_000
RETRY_MAX_DELAY_S = 10.0

# (stream id, fields). The fields are empty when the entry was deleted while pending.
Entry = tuple[bytes, dict[bytes, bytes]]


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _parse_uuid(fields: dict[bytes, bytes], name: bytes) -> uuid.UUID | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        return uuid.UUID(raw.decode())
    except ValueError:
        return None


class StreamConsumer:
    def __init__(
        self,
        ctx: DispatcherContext,
        name: str | None = None,
        *,
        claim_idle_ms: int = CLAIM_IDLE_MS,
        read_block_ms: int = READ_BLOCK_MS,
        max_batches_in_flight: int = MAX_BATCHES_IN_FLIGHT,
    ) -> None:
        self.ctx = ctx
        self.name = name or default_consumer_name()
        self.claim_idle_ms = claim_idle_ms
        self.read_block_ms = read_block_ms
        self.max_batches_in_flight = max_batches_in_flight
        self._group = ctx.keys.dispatcher_group
        self._streams = (ctx.keys.new_messages_stream, ctx.keys.device_events_stream)
        self._groups_ready = False
        # Whether entries delivered to this name earlier and not acknowledged may wait:
        # those of a previous run, or of a batch interrupted by a Redis or Postgres failure.
        self._own_pending_unread = True
        self._next_claim_at = 0.0
        # Batches being handled, and the last batch of presence events among them.
        self._batches: set[asyncio.Task[None]] = set()
        self._last_event_batch: asyncio.Task[None] | None = None
        # The first error of a batch task, raised by the next step of the run loop.
        self._batch_error: BaseException | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, finishing the batches in hand first.

        While Postgres or Redis is unavailable, the consumer retries with a growing
        delay. Any other error ends the run.
        """
        failures = 0
        try:
            while not stop.is_set():
                try:
                    await self._step()
                except Exception as error:
                    if not is_transient(error):
                        raise
                    failures += 1
                    delay_s = min(RETRY_MAX_DELAY_S, 0.5 * 2 ** (failures - 1))
                    log.warning(
                        "stream consumer failed; retrying",
                        error=repr(error),
                        retry_in_s=delay_s,
                    )
                    self._own_pending_unread = True
                    await sleep_unless_stopped(stop, delay_s)
                else:
                    failures = 0
        finally:
            await self._finish_batches()
            if self._batch_error is not None:
                log.warning(
                    "a batch failed while stopping; its entries stay pending",
                    error=repr(self._batch_error),
                )

    async def _step(self) -> None:
        if self._batch_error is not None:
            error, self._batch_error = self._batch_error, None
            raise error
        if not self._groups_ready:
            await self._create_groups()
        loop = asyncio.get_running_loop()
        try:
            if self._own_pending_unread:
                # Entries of batches still in flight are pending too, so reading them
                # now would handle them twice.
                await self._finish_batches()
                await self._read_own_pending()
                self._own_pending_unread = False
            if loop.time() >= self._next_claim_at:
                await self._claim_idle_entries()
                self._next_claim_at = loop.time() + CLAIM_INTERVAL_S
            await self._read_new()
        except ResponseError as error:
            # A Redis restart without persistence, or a flush, deletes the streams and
            # their groups, so they are created again. A read blocked at that moment
            # fails with UNBLOCKED, and later ones with NOGROUP.
            if not str(error).startswith(("NOGROUP", "UNBLOCKED")):
                raise
            log.warning("consumer group missing; creating it again")
            self._groups_ready = False

    async def _create_groups(self) -> None:
        for stream in self._streams:
            try:
                # From "0", so entries added before the group existed are read too.
                await self.ctx.redis.xgroup_create(
                    stream, self._group, id="0", mkstream=True
                )
            except ResponseError as error:
                if not str(error).startswith("BUSYGROUP"):
                    raise
            else:
                log.info("consumer group created", stream=stream, group=self._group)
        self._groups_ready = True

    async def _read_new(self) -> None:
        # Entries not read yet wait in Redis, so the next read takes them as one batch.
        while len(self._batches) >= self.max_batches_in_flight:
            await asyncio.wait(self._batches, return_when=asyncio.FIRST_COMPLETED)
        response = await self.ctx.redis.xreadgroup(
            self._group,
            self.name,
            dict.fromkeys(self._streams, ">"),
            count=READ_COUNT,
            block=self.read_block_ms,
        )
        for stream, entries in response or []:
            self._start_batch(stream.decode(), entries)

    def _start_batch(self, stream: str, entries: Sequence[Entry]) -> None:
        if stream == self.ctx.keys.new_messages_stream:
            batch = asyncio.create_task(self._handle(stream, entries))
        else:
            batch = asyncio.create_task(
                self._handle_after(self._last_event_batch, stream, entries)
            )
            self._last_event_batch = batch
        self._batches.add(batch)
        batch.add_done_callback(self._batch_done)

    async def _handle_after(
        self,
        previous: asyncio.Task[None] | None,
        stream: str,
        entries: Sequence[Entry],
    ) -> None:
        """Handle a batch once `previous` has finished, unless `previous` failed.

        After a failure this batch stays pending too, and both are read again in
        stream order.
        """
        if previous is not None:
            await asyncio.wait([previous])
            if previous.cancelled() or previous.exception() is not None:
                return
        await self._handle(stream, entries)

    def _batch_done(self, batch: "asyncio.Task[None]") -> None:
        self._batches.discard(batch)
        if batch is self._last_event_batch:
            self._last_event_batch = None
        if batch.cancelled():
            return
        error = batch.exception()
        if error is not None and self._batch_error is None:
            self._batch_error = error

    async def _finish_batches(self) -> None:
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    async def _read_own_pending(self) -> None:
        next_ids: dict[str, bytes | str] = dict.fromkeys(self._streams, "0")
        while next_ids:
            streams: dict[KeyT, StreamIdT] = {
                stream: stream_id for stream, stream_id in next_ids.items()
            }
            response = await self.ctx.redis.xreadgroup(
                self._group, self.name, streams, count=READ_COUNT
            )
            read = {stream.decode(): entries for stream, entries in response or []}
            for stream in list(next_ids):
                entries = read.get(stream)
                if not entries:
                    del next_ids[stream]
                    continue
                await self._handle(stream, entries)
                next_ids[stream] = entries[-1][0]

    async def _claim_idle_entries(self) -> None:
        for stream in self._streams:
            start_id: bytes | str = "0-0"
            while True:
                next_start_id, entries, *_ = await self.ctx.redis.xautoclaim(
                    stream,
                    self._group,
                    self.name,
                    min_idle_time=self.claim_idle_ms,
                    start_id=start_id,
                    count=READ_COUNT,
                )
                if entries:
                    log.info(
                        "idle stream entries claimed", stream=stream, count=len(entries)
                    )
                    await self._handle(stream, entries)
                if next_start_id in (b"0-0", "0-0"):
                    break
                start_id = next_start_id
            await self._delete_dead_consumers(stream)

    async def _delete_dead_consumers(self, stream: str) -> None:
        consumers = await self.ctx.redis.xinfo_consumers(stream, self._group)
        for consumer in consumers:
            name = consumer["name"].decode()
            if name == self.name or consumer["pending"] > 0:
                continue
            if consumer["idle"] < DEAD_CONSUMER_IDLE_MS:
                continue
            await self.ctx.redis.xgroup_delconsumer(stream, self._group, name)
            log.info("idle consumer removed", stream=stream, consumer=name)

    async def _handle(self, stream: str, entries: Sequence[Entry]) -> None:
        """Handle a batch of one stream, then acknowledge and delete its entries.

        A failure from the data of an entry is logged and the entry acknowledged anyway,
        since the sweeps over Postgres retry its message. A transient failure propagates
        and leaves the whole batch pending for the next attempt.
        """
        if stream == self.ctx.keys.new_messages_stream:
            await self._handle_new_messages(entries)
        else:
            await self._handle_device_events(entries)

        entry_ids = [entry_id for entry_id, _ in entries]
        async with self.ctx.redis.pipeline(transaction=False) as pipe:
            pipe.xack(stream, self._group, *entry_ids)
            pipe.xdel(stream, *entry_ids)
            await pipe.execute()

    async def _handle_new_messages(self, entries: Sequence[Entry]) -> None:
        message_ids = []
        carried = []
        for entry_id, fields in entries:
            message = queues.read_new_message(fields)
            if message is not None:
                carried.append(PendingMessage.new(message))
                continue
            message_id = _parse_uuid(fields, b"message_id")
            if message_id is None:
                if fields:
                    log.warning("invalid new-message entry dropped", entry_id=entry_id)
                continue
            message_ids.append(message_id)

        try:
            await assign_messages(self.ctx, message_ids, carried)
        except Exception as error:
            if is_transient(error):
                raise
            log.exception("assignment failed; the pending sweep retries it")

    async def _handle_device_events(self, entries: Sequence[Entry]) -> None:
        events: list[tuple[uuid.UUID, str]] = []
        for entry_id, fields in entries:
            device_id = _parse_uuid(fields, b"device_id")
            if device_id is None:
                if fields:
                    log.warning("invalid device event dropped", entry_id=entry_id)
                continue
            events.append(
                (device_id, fields.get(b"event", b"").decode(errors="replace"))
            )

        for device_id, event in await select_events_to_handle(self.ctx, events):
            try:
                await handle_device_event(self.ctx, device_id, event)
            except Exception as error:
                if is_transient(error):
                    raise
                log.exception(
                    "device event failed", device_id=str(device_id), event=event
                )
