"""One device connection: frames in, replies and tasks out, over any transport.

A transport (the WebSocket endpoint today, HTTP with server-sent events later) accepts
the connection, asks the Hub for a session, feeds it every text or binary frame, and
reports when the connection ends. The session decides what to answer and does the work
through DeviceService; it never touches sockets itself.
"""

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from mensajero_common import protocol
from mensajero_common.keys import (
    CHANNEL_CONNECTED_PREFIX,
    CHANNEL_DISABLE,
    CHANNEL_REVOKE,
    CHANNEL_TASK_PREFIX,
    CHANNEL_WAKE,
)
from mensajero_common.metrics import TASK_PUSH_LATENCY
from mensajero_common.protocol import (
    PingFrame,
    RegisterFrame,
    SmsIncomingFrame,
    SmsReportFrame,
)
from mensajero_common.status import IN_FLIGHT_STATUSES
from mensajero_common.transient import is_transient
from mensajero_hub.core import frames
from mensajero_hub.core.frames import (
    ConnectionReplacedError,
    DeviceDisabledError,
    DeviceGoneError,
    FrameRejectedError,
)
from mensajero_hub.core.service import DeviceIdentity, DeviceService
from mensajero_hub.core.state import (
    CarriedTask,
    ConnectionState,
    FrameBucket,
    TaskEntry,
    parse_carried_task,
)

if TYPE_CHECKING:
    from mensajero_hub.core.hub import Hub

log = structlog.get_logger(__name__)
# The stdlib logger behind `log`. Its level is checked first, so that the DEBUG lines of
# every frame cost no bind and no run of the processors when DEBUG is off.
_stdlib_log = logging.getLogger(__name__)

# Tasks read from the device's stream per round trip.
PUSH_BATCH_SIZE = 100
# How long closing a connection may wait for the transport, e.g. on a peer that stopped
# reading; the session is released even if the close frame could not be written.
CLOSE_TIMEOUT_S = 5.0
# After a push round failed because Postgres or Redis was unavailable, the session reads
# the stream again after this delay, doubled for each further failure in a row up to
# PUSH_RETRY_MAX_DELAY_S.
PUSH_RETRY_DELAY_S = 1.0
PUSH_RETRY_MAX_DELAY_S = 30.0


def push_retry_delay_s(failures: int) -> float:
    """Return the wait before the next push round after `failures` failed in a row."""
    # The exponent is capped, because from 1,025 failures on the float product would
    # raise OverflowError. 2**30 is far past any maximum delay.
    exponent = min(failures - 1, 30)
    return min(PUSH_RETRY_MAX_DELAY_S, PUSH_RETRY_DELAY_S * 2**exponent)


def observe_push_latency(task: dict[str, Any]) -> None:
    """Record the time from the message's creation to its task frame being sent."""
    created = task.get("created_at")
    if not isinstance(created, str):
        return
    try:
        created_at = datetime.fromisoformat(created)
    except ValueError:
        return
    if created_at.tzinfo is None:
        return
    TASK_PUSH_LATENCY.observe(
        max(0.0, (datetime.now(UTC) - created_at).total_seconds())
    )


class Transport(Protocol):
    """What a session needs from the connection that carries it."""

    async def send(self, frame: dict[str, Any]) -> bool:
        """Send one frame; return False when the connection is already closed."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the connection with a WebSocket close code, or its equivalent."""
        ...


class DeviceSession:
    # Slots instead of an instance dict, because one hub keeps tens of thousands of idle
    # sessions. Settings that every session shares are read from the service.
    __slots__ = (
        "_backlog_pushed",
        "_carried",
        "_hub",
        "_push_failures",
        "_push_retry",
        "_push_task",
        "_read_pending",
        "_service",
        "_transport",
        "close_code",
        "close_reason",
        "closing",
        "identity",
        "language",
        "released",
        "state",
        "subscribed",
    )

    def __init__(
        self,
        hub: "Hub",
        service: DeviceService,
        identity: DeviceIdentity,
        transport: Transport,
        language: str,
        now_s: float,
    ) -> None:
        self._hub = hub
        self._service = service
        self._transport = transport
        self.identity = identity
        self.language = language
        self.state = ConnectionState(
            device_id=identity.device_id,
            connection_id=uuid.uuid4().hex,
            opened_at_s=now_s,
            last_frame_at_s=now_s,
            last_touch_at_s=now_s,
        )
        self.state.frame_bucket = FrameBucket.full(
            service.settings.DEVICE_FRAMES_PER_SECOND, now_s
        )
        self.subscribed = False
        self.closing = False
        self.released = False
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._push_task: asyncio.Task[None] | None = None
        # Set when the stream has to be read from the cursor on the next round.
        self._read_pending = False
        # Tasks from the device's channel not pushed yet; None while there are none.
        self._carried: list[CarriedTask] | None = None
        # Set once the tasks queued before this connection opened have been pushed.
        self._backlog_pushed = False
        # Push rounds failed in a row on an unavailable Postgres or Redis, and the timer
        # of the next try.
        self._push_failures = 0
        self._push_retry: asyncio.TimerHandle | None = None

    @property
    def log(self) -> Any:
        """The logger with this connection's ids, bound on use, so that each of thousands
        of idle connections does not keep one."""
        return log.bind(
            device_id=str(self.identity.device_id),
            connection_id=self.state.connection_id,
        )

    @property
    def device_id(self) -> uuid.UUID:
        return self.identity.device_id

    @property
    def connection_id(self) -> str:
        return self.state.connection_id

    @property
    def is_open(self) -> bool:
        return not self.closing and not self.released

    # Lifecycle.

    async def start(self) -> None:
        """Take over the device, mark it online and push every task it has not reported on."""
        heartbeat_at = await self._service.presence.open_connection(
            self.device_id, self.connection_id
        )
        if heartbeat_at is None:
            # The device was deleted between authentication and now.
            await self.close(protocol.CLOSE_REVOKED, frames.REASON_REVOKED)
            return
        self.state.record_touch(self._hub.now_s(), heartbeat_at)

        self.wake()

    async def close(self, code: int, reason: str) -> None:
        """Close the connection once; release it at once if the transport does not close."""
        if self.closing or self.released:
            return
        self.closing = True
        self.close_code = code
        self.close_reason = reason
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._transport.close(code, reason)
        except TimeoutError:
            self.log.warning("close timed out, releasing the connection", code=code)
            await self._hub.release(self, code)

    def stop_background_work(self) -> None:
        if self._push_task is not None and not self._push_task.done():
            self._push_task.cancel()
        if self._push_retry is not None:
            self._push_retry.cancel()
            self._push_retry = None
        self._carried = None
        self.state.forget_all()

    # Frames from the phone.

    async def handle_text(self, raw: str) -> None:
        if self.closing:
            # Frames can still arrive after the close frame went out. They are not
            # applied and get no reply, as the phone must send them again anyway.
            return
        now_s = self._hub.now_s()
        self.state.record_frame(now_s)
        try:
            if await self._admit(now_s):
                await self._handle_frame(raw)
        finally:
            await self._touch_if_due(now_s)

    async def handle_binary(self, size_bytes: int) -> None:
        if self.closing:
            return
        now_s = self._hub.now_s()
        self.state.record_frame(now_s)
        if not await self._admit(now_s):
            return
        self._debug("binary frame rejected", size_bytes=size_bytes)
        await self._reject(
            FrameRejectedError("invalid_frame", reason=protocol.INVALID_FRAME_BINARY)
        )

    async def _admit(self, now_s: float) -> bool:
        """Take the frame's token from the connection's bucket, or reject the frame.

        A rejected frame is not parsed or applied, and gets a `rate_limited` error without
        its request_id, since reading that would mean parsing it. A flood that goes on
        for DEVICE_FRAME_FLOOD_MAX_ERRORS rejections in a row closes the connection.
        """
        bucket = self.state.frame_bucket
        if bucket is None or bucket.admit(now_s):
            return True

        limit = f"{self._service.settings.DEVICE_FRAMES_PER_SECOND}/s"
        retry_after_s = bucket.retry_after_s()
        await self._send(
            frames.error_reply(
                "rate_limited",
                self.language,
                details={"limit": limit, "retry_after": retry_after_s},
                limit=limit,
                retry_after=retry_after_s,
            )
        )
        flood_max_errors = self._service.settings.DEVICE_FRAME_FLOOD_MAX_ERRORS
        if bucket.consecutive_rejections >= flood_max_errors:
            self.log.info(
                "closing after a frame flood", rejected=bucket.consecutive_rejections
            )
            await self.close(protocol.CLOSE_RATE_LIMITED, frames.REASON_RATE_LIMITED)
        elif bucket.consecutive_rejections == 1:
            self.log.info("frame rate limited", limit=limit)
        return False

    async def _handle_frame(self, raw: str) -> None:
        try:
            frame = protocol.parse_client_frame(raw)
        except protocol.FrameError as error:
            self._debug("invalid frame", error=error.code)
            await self._reject(
                FrameRejectedError(
                    error.code, request_id=error.request_id, **error.params
                )
            )
            return

        self._debug("frame received", frame_type=frame.type)
        try:
            reply = await self._apply(frame)
        except FrameRejectedError as error:
            await self._reject(error)
            return
        except DeviceGoneError:
            # The frame gets no ack, so the phone keeps it in its outbox.
            self.log.info("closing connection: device deleted", frame_type=frame.type)
            await self.close(protocol.CLOSE_REVOKED, frames.REASON_REVOKED)
            return
        except DeviceDisabledError as error:
            # No ack either, so the phone keeps the frame until it is enabled again.
            await self._close_disabled(error.reason)
            return
        except ConnectionReplacedError:
            # The announcement of the newer connection may not have arrived yet.
            self.log.info("closing connection: replaced", frame_type=frame.type)
            await self.close(protocol.CLOSE_REPLACED, frames.REASON_REPLACED)
            return
        except Exception:
            self.log.exception("frame handling failed", frame_type=frame.type)
            await self._send(
                frames.error_reply(
                    "internal_error", self.language, request_id=frame.request_id
                )
            )
            return

        self.state.record_success()
        await self._send(reply)

    async def _apply(
        self, frame: RegisterFrame | SmsReportFrame | SmsIncomingFrame | PingFrame
    ) -> dict[str, Any]:
        if isinstance(frame, PingFrame):
            return frames.pong(datetime.now(UTC), frame.request_id)

        if isinstance(frame, SmsReportFrame):
            outcome = await self._service.apply_report(self.identity, frame)
            # Once the phone no longer holds the task (finished, moved, or waiting for a
            # retry that comes as a new task), its record goes.
            if outcome.status not in IN_FLIGHT_STATUSES or outcome.moved_away:
                self.state.forget(frame.message_id)
            return frames.report_ack(
                frame.message_id,
                outcome.status.value,
                outcome.attempt,
                frame.request_id,
            )

        if isinstance(frame, SmsIncomingFrame):
            message_id = await self._service.store_incoming(self.identity, frame)
            return frames.incoming_ack(message_id, frame.sms_id, frame.request_id)

        identity = await self._service.register(
            self.identity, frame, self.connection_id
        )
        settings = self._service.settings
        return frames.register_ack(
            device_id=identity.device_id,
            name=identity.name,
            phone_number=identity.phone_number,
            request_id=frame.request_id,
            ping_interval_s=settings.WEBSOCKET_PING_INTERVAL,
            heartbeat_timeout_s=settings.WEBSOCKET_HEARTBEAT_TIMEOUT,
            max_frame_bytes=settings.WEBSOCKET_MAX_FRAME_BYTES,
            max_frames_per_s=settings.DEVICE_FRAMES_PER_SECOND,
        )

    async def _reject(self, error: FrameRejectedError) -> None:
        close = self.state.record_error()
        await self._send(
            frames.error_reply(
                error.code,
                self.language,
                request_id=error.request_id,
                details=error.details,
                **error.params,
            )
        )
        if close:
            self.log.info("closing after too many invalid frames")
            await self.close(
                protocol.CLOSE_TOO_MANY_ERRORS, frames.REASON_TOO_MANY_ERRORS
            )

    def _debug(self, event: str, **fields: Any) -> None:
        if _stdlib_log.isEnabledFor(logging.DEBUG):
            self.log.debug(event, **fields)

    async def _send(self, frame: dict[str, Any]) -> bool:
        if self.released:
            return False
        return await self._transport.send(frame)

    async def _touch_if_due(self, now_s: float) -> None:
        """Refresh the connection key and the heartbeat at most once per touch interval."""
        if self.closing or not self.state.needs_touch(
            now_s, self._service.touch_interval_s
        ):
            return
        # Set before the awaits, so frames arriving meanwhile do not touch again.
        self.state.last_touch_at_s = now_s
        expires_at = self.identity.api_key_expires_at
        if expires_at is not None and expires_at <= datetime.now(UTC):
            self.log.info("closing connection: device API key expired")
            await self.close(
                protocol.CLOSE_INVALID_API_KEY, frames.REASON_INVALID_API_KEY["expired"]
            )
            return
        try:
            touch = await self._service.presence.touch(
                self.device_id, self.connection_id
            )
        except Exception:
            self.log.warning("heartbeat write failed", exc_info=True)
            return
        if not touch.newest:
            await self.close(protocol.CLOSE_REPLACED, frames.REASON_REPLACED)
        elif touch.heartbeat_at is None:
            # The device row is gone, e.g. with its owner deleted in Postgres.
            self.log.info("closing connection: device deleted")
            await self.close(protocol.CLOSE_REVOKED, frames.REASON_REVOKED)
        elif touch.disabled_reason is not None:
            # Disabled in Postgres alone, which publishes no message on the channel.
            await self._close_disabled(touch.disabled_reason)
        else:
            self.state.record_touch(now_s, touch.heartbeat_at)

    # Messages on the device's channel.

    def on_channel_message(self, data: bytes) -> None:
        if not self.is_open:
            return
        if data.startswith(CHANNEL_TASK_PREFIX.encode()):
            self._receive_task(data)
        elif data == CHANNEL_WAKE.encode():
            self.wake()
        elif data == CHANNEL_REVOKE.encode():
            self._hub.spawn(self.close(protocol.CLOSE_REVOKED, frames.REASON_REVOKED))
        elif data == CHANNEL_DISABLE.encode():
            self._hub.spawn(self._close_disabled("device_inactive"))
        elif data.startswith(CHANNEL_CONNECTED_PREFIX.encode()):
            other = data[len(CHANNEL_CONNECTED_PREFIX) :].decode(errors="replace")
            if other != self.connection_id:
                self._hub.spawn(self._close_if_replaced())

    async def _close_disabled(self, reason: str) -> None:
        """Close with 4001 after the `invalid_api_key` error that a new connection of a
        disabled device or account gets, so that the phone can tell a disabled device
        from a revoked key. `reason` is "device_inactive" or "user_inactive"."""
        if not self.is_open:
            return
        self.log.info("closing connection: device or account disabled", reason=reason)
        frame = frames.error_reply("invalid_api_key", self.language, reason=reason)
        # Bounded, so that a phone that stopped reading cannot hold off the close.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._send(frame)
        await self.close(
            protocol.CLOSE_INVALID_API_KEY, frames.REASON_INVALID_API_KEY[reason]
        )

    async def _close_if_replaced(self) -> None:
        """Close this connection unless the device's connection key still names it.

        Announcements of two connections that open at the same moment can arrive in either
        order; the key, set by the connection that opened last, decides which one stays.
        """
        current = await self._service.connection_keys.current(self.device_id)
        if current != self.connection_id:
            await self.close(protocol.CLOSE_REPLACED, frames.REASON_REPLACED)

    # Tasks.

    def wake(self) -> None:
        """Push new tasks of the device's stream; coalesce wakes that arrive meanwhile."""
        if not self.is_open:
            return
        self._read_pending = True
        self._start_pushing()

    def _receive_task(self, data: bytes) -> None:
        """Push a task that arrived on the device's channel, without reading the stream
        when no entry can be missing before it."""
        carried = parse_carried_task(data)
        if carried is None:
            self.log.warning("malformed task message, reading the stream")
            self.wake()
            return
        if self._carried is None:
            self._carried = []
        self._carried.append(carried)
        self._start_pushing()

    def _start_pushing(self) -> None:
        if self._push_task is not None and not self._push_task.done():
            return
        self._push_task = asyncio.create_task(self._push_until_idle())
        self._push_task.add_done_callback(self._forget_push_task)

    def _forget_push_task(self, task: "asyncio.Task[None]") -> None:
        # A finished task would otherwise stay with its coroutine until the next wake.
        if self._push_task is task:
            self._push_task = None

    async def _push_until_idle(self) -> None:
        # A round moves the cursor past the entries it reads before it pushes them. So a
        # round that fails on an unavailable Postgres or Redis puts the cursor back, and
        # the retry reads those entries again. The state remembers the entries already
        # pushed, so none is pushed twice on this connection.
        cursor = self.state.read_cursor
        try:
            while self.is_open:
                cursor = self.state.read_cursor
                if self._read_pending:
                    self._read_pending = False
                    # Each task carried so far was in the stream before its message was
                    # published, so this read covers it.
                    self._carried = None
                    await self._push_new_tasks()
                elif self._carried:
                    carried, self._carried = self._carried, None
                    await self._push_carried(carried)
                else:
                    self._push_failures = 0
                    return
        except Exception as error:
            if not is_transient(error):
                # The tasks stay in the stream: the next connection pushes them.
                self.log.exception("pushing tasks failed")
                return
            self.state.read_cursor = cursor
            self._read_pending = True
            self._push_failures += 1
            delay_s = push_retry_delay_s(self._push_failures)
            self.log.warning(
                "pushing tasks failed: Postgres or Redis is unavailable",
                error=repr(error),
                retry_in_s=delay_s,
                failures=self._push_failures,
            )
            if self._push_retry is not None:
                self._push_retry.cancel()
            self._push_retry = asyncio.get_running_loop().call_later(
                delay_s, self._retry_push
            )

    def _retry_push(self) -> None:
        self._push_retry = None
        self.wake()

    async def _push_new_tasks(self) -> None:
        while self.is_open:
            entries = await self._service.read_tasks(
                self.device_id, self.state.read_cursor, PUSH_BATCH_SIZE
            )
            self.state.advance_cursor(entries)
            fresh = self.state.select_unpushed(entries)
            if fresh:
                await self._push_entries(fresh)
            if len(entries) < PUSH_BATCH_SIZE:
                self._backlog_pushed = True
                return

    async def _push_carried(self, carried: list[CarriedTask]) -> None:
        nothing_read = self.state.read_cursor is None
        entries = self.state.take_carried(carried)
        if entries is None:
            # An entry this connection has not read may come before them.
            self._read_pending = True
            return
        if nothing_read and entries:
            # The stream was empty before the first of them, so it held no backlog.
            self._backlog_pushed = True
        fresh = self.state.select_unpushed(entries)
        if fresh:
            await self._push_entries(fresh)

    async def _find_pushable(
        self, entries: list[TaskEntry]
    ) -> dict[uuid.UUID, int | None]:
        """Return the current attempt of each message whose task may be pushed.

        The backlog (entries queued before this connection opened) is checked in
        Postgres, because it may hold tasks that ended, moved or expired while the device
        was away. An entry queued since then is trusted without a query, unless its
        `expires_at` has passed, because its assignment committed just before the
        dispatcher queued it. A task that moves or ends meanwhile is still not sent
        twice. The phone sends only after the `ack` of its `sending` claim names its own
        attempt, and the hub applies that claim under the message's row lock.
        """
        if not self._backlog_pushed:
            checked = await self._service.find_pushable(
                self.device_id, {entry.message_id for entry in entries}
            )
            return dict(checked)
        now = datetime.now(UTC)
        latest: dict[uuid.UUID, int | None] = {}
        for entry in entries:
            if entry.is_expired(now):
                continue
            # A later attempt of a message replaces an earlier one: that attempt ended.
            known = latest.get(entry.message_id)
            if entry.message_id not in latest or (entry.attempt or 0) > (known or 0):
                latest[entry.message_id] = entry.attempt
        return latest

    async def _push_entries(self, entries: list[TaskEntry]) -> None:
        pushable = await self._find_pushable(entries)
        stale: list[bytes] = []
        for entry in entries:
            # An entry of an earlier attempt is stale too: its attempt ended.
            if entry.message_id not in pushable or entry.attempt not in (
                None,
                pushable[entry.message_id],
            ):
                stale.append(entry.stream_id)
                continue
            if not self.state.mark_pushed(entry):
                continue
            if not await self._send(entry.task):
                return
            observe_push_latency(entry.task)
            self._debug("task pushed", message_id=str(entry.message_id))
        if stale:
            # Final, expired, moved to another device, or an ended attempt: sending it now
            # would send an SMS twice or too late.
            await self._service.drop_task_entries(self.device_id, stale)
