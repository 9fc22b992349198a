"""A simulated phone: one device's WebSocket to the device-hub, with the real protocol.

The agent connects with the device's API key, registers, sends each task's SMS through its
SendingBackend and reports `sending`, then `sent` or `failed`, then `delivered`. It pings on
a schedule, uploads incoming SMS until the hub acknowledges them, and reconnects with
exponential backoff and full jitter when the connection drops. Every frame goes out in
order through one writer per connection, paced to the frame rate that the hub announces
in its register ack (see mensajero_agent.pacing). The `retry_after` of a hub's `error`
frame is honoured: after `rate_limited` the agent sends nothing for that long and then
sends the unacknowledged frames again, and if the hub closes the connection it reconnects
no sooner. After close code 4030 (too many failed authentications from its address) it
waits the `retry_after` of the `too_many_auth_failures` error plus a random spread. A
`register` that the hub rejects for a field it cannot accept (such as a `device_name` with
a control character) stops the agent with RegisterRejectedError, because every reconnect
would send the same fields.

Reports and incoming SMS wait in an outbox until their `ack` arrives and are sent again
after each reconnect, because the hub applies each of them once however often it gets
them. With a ledger file, the outbox outlives a restart of the agent too. A task
offered again is never sent again: the agent reports the outcome it recorded. Only a
new `attempt` of a message whose send failed with nothing sent is sent again (the
server's retry), and a task past its `expires_at` is reported `expired` and not sent.

`stop()` stops gracefully: the agent takes no new task, lets the sends in flight finish
and their reports reach the hub within `stop_grace_s`, and only then cuts short what is
left (see `Agent.stop`). A `sent` SMS whose delivery report was still due when the agent
stopped or was killed gets that report after a restart with the same ledger file.
"""

import asyncio
import contextlib
import random
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)

from mensajero_agent import __version__
from mensajero_agent.backend import SendingBackend, SendOutcome, SimulatedBackend
from mensajero_agent.events import EventHandler, make_event
from mensajero_agent.ledger import MessageLedger, Outcome
from mensajero_agent.pacing import FramePacer, frame_rate_per_s
from mensajero_agent.urls import handshake_failure_message, redact_api_key

PROTOCOL_VERSION = 1

# Close codes of the device-hub that mean reconnecting cannot help.
CLOSE_SERVICE_RESTART = 1012
# After 1012 the server is restarting and the tasks wait, so the agent comes back within
# this many seconds (a random share of it), whatever the backoff reached.
RESTART_RECONNECT_MAX_S = 5.0
CLOSE_INVALID_API_KEY = 4001
CLOSE_REPLACED = 4002
CLOSE_REVOKED = 4003
# The hub rejected the connection unchecked because too many authentications from this
# address failed. The `too_many_auth_failures` error frame before the close gives
# `retry_after`, which the agent waits plus a random share of THROTTLED_JITTER_MAX_S, so
# that phones behind one address do not all return at the same instant.
CLOSE_AUTH_THROTTLED = 4030
THROTTLED_JITTER_MAX_S = 5.0
FATAL_CLOSE_CODES = {
    CLOSE_INVALID_API_KEY: "the server rejected the API key",
    CLOSE_REPLACED: "another connection with the same API key replaced this one",
    CLOSE_REVOKED: "the device's API key was revoked or the device deleted",
}
# Causes of close code 4001 that leave the key valid, by the `reason` of the
# `invalid_api_key` error frame before the close. The same key connects again once the
# device or account is enabled.
DISABLED_REASONS = {
    "device_inactive": "the device is disabled",
    "user_inactive": "the account is disabled",
}

# Errors after which a report or an incoming SMS is dropped from the outbox, because
# sending the same frame again would get the same error.
PERMANENT_ERRORS = frozenset(
    {"invalid_frame", "unknown_frame_type", "report_not_allowed"}
)
# Errors of a `register` that stop the agent. Its fields come from the agent's options,
# which do not change while it runs, so every reconnect would get the same error. Other
# errors, such as `internal_error`, are transient: the agent reconnects after them.
REGISTER_PERMANENT_ERRORS = frozenset(
    {"invalid_frame", "unknown_frame_type", "invalid_phone_number"}
)
# The agent's own close of a connection whose `register` the hub rejected.
CLOSE_NORMAL = 1000
REASON_REGISTER_REJECTED = "register rejected"

# After the stop grace period, the seconds that `stop()` waits for the acks of the
# `failed` reports of the sends it cut short, before it closes the connection.
STOP_REPORT_WAIT_S = 1.0
# The error of a send that `stop()` cut short before the SMS went out.
SEND_CUT_BY_STOP = "send cancelled before the SMS went out, because the agent stopped"


class AgentStoppedError(Exception):
    """The agent stopped for good: `code` is the close code that made reconnecting useless.

    `reason` is the close reason, for people. `key_error_reason` is the machine code of
    the `invalid_api_key` error before a close 4001 (such as `device_inactive`), or None
    when no such error came.
    """

    def __init__(
        self, code: int, reason: str, key_error_reason: str | None = None
    ) -> None:
        self.code = code
        self.reason = reason
        self.key_error_reason = key_error_reason
        cause = FATAL_CLOSE_CODES.get(code, "closed")
        if self.key_still_valid:
            cause = DISABLED_REASONS[key_error_reason or ""]
        super().__init__(f"{cause} ({code}: {reason})")

    @property
    def key_still_valid(self) -> bool:
        """Whether the key works again once the device or account is enabled."""
        return (
            self.code == CLOSE_INVALID_API_KEY
            and self.key_error_reason in DISABLED_REASONS
        )


class RegisterRejectedError(AgentStoppedError):
    """The hub rejected the `register` with an error that sending it again cannot fix.

    `error` is the hub's machine code (such as `invalid_frame`), `fields` the names of
    the rejected fields (such as `device_name`), and `message` the hub's text for people.
    `code` is 1000, the close the agent sends before it stops.
    """

    def __init__(self, error: str, fields: tuple[str, ...], message: str) -> None:
        self.error = error
        self.fields = fields
        self.message = message
        super().__init__(CLOSE_NORMAL, REASON_REGISTER_REJECTED)

    def __str__(self) -> str:
        return f"the hub rejected the register: {self.message} ({self.error})"


@dataclass
class AgentConfig:
    url: str
    api_key: str
    device_name: str | None = None
    phone_number: str | None = None
    app_version: str = f"mensajero-agent/{__version__}"
    # Seconds between pings; None uses the interval the hub sends in its register ack.
    ping_interval_s: float | None = None
    # Seconds to wait for a pong, or for the register ack, before the connection counts
    # as dead and the agent reconnects.
    pong_timeout_s: float = 20.0
    # Seconds after which an unacknowledged report or incoming SMS is sent again.
    resend_after_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    open_timeout_s: float = 10.0
    language: str | None = None
    # Report each part of a multipart SMS (`part`, `parts`) instead of the whole message.
    report_parts: bool = False
    # Maximum frames per second the agent sends. The hub's `max_frames_per_s` from the
    # register ack applies when it is lower or this is None, and DEFAULT_FRAMES_PER_S
    # of mensajero_agent.pacing when the ack has none either.
    max_frames_per_s: float | None = None
    # Seconds that `stop()` waits for the sends in flight to finish and for the hub to
    # acknowledge their reports, before it cuts the sends short.
    stop_grace_s: float = 5.0


@dataclass
class _Outgoing:
    """A frame waiting for its turn on the connection.

    An outbox entry is queued by `request_id` and read when its turn comes, so that one
    acknowledged while it waited is not sent. Other frames are queued as `frame`.
    """

    frame: dict[str, Any] | None = None
    request_id: str | None = None
    # Resolved once the frame is written; None when no caller waits for that.
    written: asyncio.Future[None] | None = None


def url_with_key(url: str, api_key: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "api_key"]
    query.append(("api_key", api_key))
    return urlunsplit(parts._replace(query=urlencode(query)))


def url_without_key(url: str) -> str:
    """Return the URL to show in events and logs, never with the key."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "api_key"]
    return urlunsplit(parts._replace(query=urlencode(query)))


def throttled_delay_s(
    retry_after_s: float | None, backoff_max_s: float, rng: random.Random
) -> float:
    """Return the wait after close 4030: the hub's retry_after plus a random spread.

    The spread is at most THROTTLED_JITTER_MAX_S, or backoff_max_s when that is smaller.
    Without a retry_after (the error frame did not arrive), the wait is backoff_max_s.
    """
    if retry_after_s is None:
        return backoff_max_s
    return retry_after_s + rng.uniform(0, min(THROTTLED_JITTER_MAX_S, backoff_max_s))


def backoff_delay_s(
    attempt: int, initial_s: float, max_s: float, rng: random.Random
) -> float:
    """Return the wait before reconnect `attempt` (0-based): full jitter up to a cap.

    Spreading reconnects uniformly over the window keeps thousands of phones that lost
    the same server from returning at the same instant.
    """
    window_s = min(max_s, initial_s * 2**attempt)
    return rng.uniform(0, window_s)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        backend: SendingBackend | None = None,
        *,
        on_event: EventHandler | None = None,
        ledger: MessageLedger | None = None,
        seed: int | None = None,
    ) -> None:
        self.config = config
        self.backend = backend if backend is not None else SimulatedBackend()
        # An empty ledger is falsy (it has a length), so test for None explicitly.
        self.ledger = ledger if ledger is not None else MessageLedger()
        self._on_event = on_event
        self._random = random.Random(seed)
        self._socket: ClientConnection | None = None
        # Frames waiting for the connection's writer, and the request_ids of outbox
        # entries among them; the queue is None while no connection is served.
        self._outgoing: asyncio.Queue[_Outgoing] | None = None
        self._queued_request_ids: set[str] = set()
        self._pacer: FramePacer | None = None
        # Set by `stop()`: no new task is sent from then on.
        self._stopping = asyncio.Event()
        # Set when the stop grace period ends, early on a second `stop()`.
        self._grace_over = asyncio.Event()
        # Set once the agent stops for good: it closes and does not reconnect.
        self._closed = asyncio.Event()
        # Set on each change that may end a wait of `stop()`: a send that ends, an ack,
        # the end of a connection.
        self._progress = asyncio.Event()
        # request_id → frame of every report and incoming SMS not acknowledged yet,
        # starting with those that a ledger file kept from an earlier run.
        self._outbox: dict[str, dict[str, Any]] = self.ledger.unacknowledged_frames()
        self._sent_at_s: dict[str, float] = {}
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        # request_id of a `sending` report → the answer its send waits for.
        self._claims: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._pong_waiter: asyncio.Future[None] | None = None
        self._ping_interval_s = config.ping_interval_s or 60.0
        # Event-loop time until which the hub asked the agent to wait: the latest end of
        # the `retry_after` of its errors on the current connection, or None.
        self._retry_at_s: float | None = None
        # `reason` of the hub's `invalid_api_key` error on the current connection.
        self._key_error_reason: str | None = None
        # request_id of the `register` sent on the current connection, and the hub's
        # rejection of it when no reconnect can fix that.
        self._register_request_id: str | None = None
        self._register_rejection: RegisterRejectedError | None = None
        self.device_id: str | None = None
        self.registered = asyncio.Event()

    # Public interface.

    async def run(self) -> None:
        """Connect and serve until `stop()`; raise AgentStoppedError on a fatal close."""
        attempt = 0
        self._resume_deliveries()
        try:
            while not self._closed.is_set():
                code, reason, was_registered = await self._connect_once()
                if self._closed.is_set():
                    break
                if self._register_rejection is not None:
                    self._emit(
                        "disconnected", code=code, reason=reason, retry_in_s=None
                    )
                    raise self._register_rejection
                if code in FATAL_CLOSE_CODES:
                    self._emit(
                        "disconnected", code=code, reason=reason, retry_in_s=None
                    )
                    raise AgentStoppedError(code, reason, self._key_error_reason)

                attempt = 0 if was_registered else attempt + 1
                delay_s = backoff_delay_s(
                    attempt,
                    self.config.backoff_initial_s,
                    self.config.backoff_max_s,
                    self._random,
                )
                retry_after_left_s = self._retry_after_left_s()
                if code == CLOSE_SERVICE_RESTART:
                    attempt = 0
                    delay_s = self._random.uniform(
                        0, min(RESTART_RECONNECT_MAX_S, self.config.backoff_max_s)
                    )
                elif code == CLOSE_AUTH_THROTTLED:
                    delay_s = throttled_delay_s(
                        retry_after_left_s, self.config.backoff_max_s, self._random
                    )
                if retry_after_left_s is not None:
                    delay_s = max(delay_s, retry_after_left_s)
                self._emit(
                    "disconnected",
                    code=code,
                    reason=reason,
                    retry_in_s=round(delay_s, 3),
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay_s):
                        await self._closed.wait()
        finally:
            self._closed.set()
            await self._cancel_in_flight()
            self._emit("stopped")

    async def stop(self) -> None:
        """Stop taking tasks, let the sends in flight finish, then close.

        1. From now on a task that needs a send is left to the server, which offers it
           again on the next connection.
        2. Wait up to `stop_grace_s` until no send is in flight and, while connected, the
           hub has acknowledged every report and incoming SMS of the outbox.
        3. Cancel the sends still in flight. A send that the backend had not finished is
           reported `failed` and retryable when the backend guarantees that nothing went
           out (see SendingBackend.unsent_when_cancelled). Otherwise its ledger record
           stays `sending`, an unknown outcome that is never sent again. A `sent` SMS
           keeps its delivery report due for the next run with the same ledger file.
           A task whose `sending` claim has no `ack` yet is not reported, because that
           `ack` may name a status in which the SMS went out. The server offers it again on the next
           connection, and ends it after its report timeout if the agent does not return.
        4. Wait up to STOP_REPORT_WAIT_S for the acks of those reports, then close.

        A second call while the first one waits, such as a second Ctrl-C, ends the grace
        period at once.
        """
        if self._closed.is_set():
            return
        if self._stopping.is_set():
            self._grace_over.set()
            self._progress.set()
            return

        self._stopping.set()
        self._emit(
            "stopping",
            in_flight=len(self._in_flight),
            grace_s=self.config.stop_grace_s,
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.stop_grace_s):
                await self._wait_until(self._drained, stop_at_grace_end=True)
        self._grace_over.set()

        await self._cancel_in_flight()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_REPORT_WAIT_S):
                await self._wait_until(self._outbox_settled)

        self._closed.set()
        socket = self._socket
        if socket is not None:
            await socket.close(1000, "agent stopping")

    def inject_incoming(
        self,
        sender: str,
        body: str,
        *,
        sms_id: str | None = None,
        timestamp: datetime | None = None,
    ) -> str:
        """Queue an incoming SMS for upload; return its sms_id. Uploads repeat until acked."""
        sms_id = sms_id or uuid.uuid4().hex
        moment = timestamp or datetime.now(UTC)
        frame = {
            "type": "sms_incoming",
            "from": sender,
            "body": body,
            "timestamp": moment.isoformat().replace("+00:00", "Z"),
            "sms_id": sms_id,
        }
        self._emit("incoming", sms_id=sms_id, **{"from": sender})
        self._queue(frame)
        return sms_id

    @property
    def pending_count(self) -> int:
        """Reports and incoming SMS that wait for an ack."""
        return len(self._outbox)

    # Stopping.

    def _outbox_settled(self) -> bool:
        """Tell whether the outbox has nothing left that could be acknowledged now."""
        connected = self._outgoing is not None and self.registered.is_set()
        return not connected or not self._outbox

    def _drained(self) -> bool:
        return not self._in_flight and self._outbox_settled()

    async def _wait_until(
        self, condition: Callable[[], bool], *, stop_at_grace_end: bool = False
    ) -> None:
        while not condition():
            if stop_at_grace_end and self._grace_over.is_set():
                return
            self._progress.clear()
            await self._progress.wait()

    async def _cancel_in_flight(self) -> None:
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # One connection.

    async def _connect_once(self) -> tuple[int, str, bool]:
        """Hold one connection until it ends; return its close code, reason and whether
        the hub acknowledged the register on it."""
        self.registered.clear()
        self._retry_at_s = None
        self._key_error_reason = None
        self._register_request_id = None
        self._register_rejection = None
        headers = {}
        if self.config.language:
            headers["Accept-Language"] = self.config.language
        try:
            async with connect(
                url_with_key(self.config.url, self.config.api_key),
                compression=None,
                ping_interval=None,
                open_timeout=self.config.open_timeout_s,
                additional_headers=headers,
                user_agent_header=self.config.app_version,
            ) as socket:
                self._socket = socket
                if self._closed.is_set():
                    # `stop()` closed the agent while the handshake was under way.
                    return CLOSE_NORMAL, "agent stopping", False
                self._emit("connected", url=url_without_key(self.config.url))
                return await self._serve(socket)
        except ConnectionClosed as closed:
            code, reason = self._close_details(closed)
            return code, reason, self.registered.is_set()
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as error:
            message = str(error)
            if isinstance(error, InvalidStatus):
                message = handshake_failure_message(error)
            self._emit("error", error="connect_failed", message=message)
            return 1006, str(error), False
        finally:
            self._socket = None

    def _close_details(self, closed: ConnectionClosed) -> tuple[int, str]:
        if closed.rcvd is None:
            return 1006, "connection lost"
        return closed.rcvd.code, closed.rcvd.reason

    async def _serve(self, socket: ClientConnection) -> tuple[int, str, bool]:
        loop = asyncio.get_running_loop()
        outgoing: asyncio.Queue[_Outgoing] = asyncio.Queue()
        # Until the register ack announces the hub's rate, only `register` goes out.
        pacer = FramePacer(
            frame_rate_per_s(None, self.config.max_frames_per_s), loop.time()
        )
        self._outgoing = outgoing
        self._queued_request_ids.clear()
        self._pacer = pacer
        background = [
            asyncio.create_task(self._write_forever(socket, outgoing, pacer)),
            asyncio.create_task(self._ping_forever(socket)),
            asyncio.create_task(self._resend_forever(socket)),
        ]
        self._register_request_id = uuid.uuid4().hex
        try:
            await self._send(
                {
                    "type": "register",
                    "request_id": self._register_request_id,
                    "device_name": self.config.device_name,
                    "phone_number": self.config.phone_number,
                    "app_version": self.config.app_version,
                    "protocol_version": PROTOCOL_VERSION,
                },
            )
            async for raw in socket:
                self._handle(raw)
                if self._register_rejection is not None:
                    # The hub keeps pushing tasks to a connection whose register it
                    # rejected. Closing it marks the device offline, so the dispatcher
                    # can move the tasks that this agent will never claim.
                    await socket.close(CLOSE_NORMAL, REASON_REGISTER_REJECTED)
                    break
        except ConnectionClosed:
            pass
        finally:
            self._outgoing = None
            self._pacer = None
            self._progress.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)

        code, reason = (1006, "connection lost")
        if socket.close_code is not None:
            code, reason = socket.close_code, socket.close_reason or ""
        return code, reason, self.registered.is_set()

    # Frames from the hub.

    def _handle(self, raw: str | bytes) -> None:
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._emit("error", error="invalid_server_frame", message="not JSON")
            return
        if not isinstance(frame, dict):
            return

        kind = frame.get("type")
        if kind == "task":
            self._on_task(frame)
        elif kind == "ack":
            self._on_ack(frame)
        elif kind == "error":
            self._on_error(frame)
        elif (
            kind == "pong"
            and self._pong_waiter is not None
            and not self._pong_waiter.done()
        ):
            self._pong_waiter.set_result(None)

    def _on_ack(self, frame: dict[str, Any]) -> None:
        of = frame.get("of")
        if of == "register":
            self.device_id = frame.get("device_id")
            if self.config.ping_interval_s is None and frame.get("ping_interval_s"):
                self._ping_interval_s = float(frame["ping_interval_s"])
            max_frames_per_s = frame_rate_per_s(
                frame.get("max_frames_per_s"), self.config.max_frames_per_s
            )
            if self._pacer is not None:
                self._pacer.set_rate(
                    max_frames_per_s, asyncio.get_running_loop().time()
                )
            self.registered.set()
            self._emit(
                "registered",
                device_id=self.device_id,
                name=frame.get("name"),
                phone_number=frame.get("phone_number"),
                ping_interval_s=self._ping_interval_s,
                max_frames_per_s=max_frames_per_s,
            )
            self._flush_outbox()
            return

        request_id = frame.get("request_id")
        if isinstance(request_id, str):
            self._outbox.pop(request_id, None)
            self._sent_at_s.pop(request_id, None)
            self.ledger.drop_frame(request_id)
            self._answer_claim(request_id, frame)
            self._progress.set()
        if of == "sms_report":
            self._emit(
                "report_ack",
                message_id=frame.get("message_id"),
                status=frame.get("status"),
            )
        elif of == "sms_incoming":
            self._emit(
                "incoming_ack",
                sms_id=frame.get("sms_id"),
                message_id=frame.get("message_id"),
            )

    def _on_error(self, frame: dict[str, Any]) -> None:
        code = frame.get("error")
        request_id = frame.get("request_id")
        self._emit(
            "error",
            error=code,
            message=frame.get("message"),
            request_id=request_id,
        )
        retry_after = frame.get("retry_after")
        if isinstance(retry_after, int | float) and not isinstance(retry_after, bool):
            self._wait_retry_after(code, max(float(retry_after), 0.0))
        reason = frame.get("reason")
        if code == "invalid_api_key" and isinstance(reason, str):
            self._key_error_reason = reason
        if (
            request_id is not None
            and request_id == self._register_request_id
            and code in REGISTER_PERMANENT_ERRORS
        ):
            self._register_rejection = RegisterRejectedError(
                str(code), _rejected_fields(frame), str(frame.get("message") or "")
            )
        if isinstance(request_id, str) and code in PERMANENT_ERRORS:
            self._outbox.pop(request_id, None)
            self._sent_at_s.pop(request_id, None)
            self.ledger.drop_frame(request_id)
            self._answer_claim(request_id, frame)
            self._progress.set()

    def _wait_retry_after(self, code: object, retry_after_s: float) -> None:
        """Send nothing for `retry_after_s` after `rate_limited`, and reconnect no sooner
        if the hub closes the connection.

        A rate-limited frame was not applied, and its error has no request_id, so every
        report and incoming SMS written and not acknowledged yet goes again after the
        wait, and so does a ping still waiting for its pong. The hub applies each report
        and incoming SMS once, so sending again a frame that it did accept changes
        nothing.
        """
        now_s = asyncio.get_running_loop().time()
        self._retry_at_s = max(self._retry_at_s or now_s, now_s + retry_after_s)
        pacer, outgoing = self._pacer, self._outgoing
        if code != "rate_limited" or pacer is None or outgoing is None:
            return

        pacer.pause_until(self._retry_at_s, now_s)
        self._emit("paused", error=code, retry_after_s=retry_after_s)
        for request_id in list(self._outbox):
            if request_id in self._sent_at_s:
                self._send_outbox_item(request_id)
        if self._pong_waiter is not None and not self._pong_waiter.done():
            outgoing.put_nowait(_Outgoing(frame={"type": "ping"}))

    def _retry_after_left_s(self) -> float | None:
        """Return the seconds left of the hub's `retry_after`, or None if it sent none."""
        if self._retry_at_s is None:
            return None
        return max(0.0, self._retry_at_s - asyncio.get_running_loop().time())

    # Tasks.

    def _on_task(self, frame: dict[str, Any]) -> None:
        message_id = str(frame.get("message_id"))
        attempt = frame.get("attempt")
        attempt = attempt if isinstance(attempt, int) else None
        known = self.ledger.get(message_id)
        self._emit(
            "task",
            message_id=message_id,
            to=frame.get("to"),
            segments=frame.get("segments"),
            encoding=frame.get("encoding"),
            attempt=attempt,
            repeated=known is not None,
        )
        if message_id in self._in_flight:
            # Being sent right now; its reports follow when the send ends.
            return

        if known is not None and not _is_retry(known, attempt):
            self._report_known(message_id, known, attempt)
            return
        if _has_expired(frame):
            error = "expires_at passed before sending"
            with self.ledger.atomic():
                self.ledger.record(message_id, "expired", error, attempt=attempt)
                self._report(message_id, "expired", error, attempt=attempt)
            return
        if self._stopping.is_set():
            # The task stays with the server, which offers it again on the next
            # connection.
            self._emit(
                "task_dropped",
                message_id=message_id,
                attempt=attempt,
                status=None,
                reason="stopping",
                error=None,
            )
            return

        self._start_in_flight(message_id, self._send_sms(message_id, frame, attempt))

    def _start_in_flight(
        self, message_id: str, work: Coroutine[Any, Any, None]
    ) -> None:
        task = asyncio.create_task(work)
        self._in_flight[message_id] = task

        def forget(_: "asyncio.Task[None]") -> None:
            self._in_flight.pop(message_id, None)
            self._progress.set()

        task.add_done_callback(forget)

    def _resume_deliveries(self) -> None:
        """Wait again for the delivery reports that were due when an earlier run ended.

        The wait starts over, because the ledger does not store how long the earlier one
        had left.
        """
        for message_id, outcome in self.ledger.deliveries_due():
            if message_id in self._in_flight:
                continue
            task = {"message_id": message_id, "attempt": outcome.attempt}
            self._start_in_flight(
                message_id, self._await_delivery(message_id, task, outcome.attempt)
            )

    def _report_known(
        self, message_id: str, known: Outcome, attempt: int | None
    ) -> None:
        """Report again what happened to a task handled before, without sending it."""
        if known.status == "sending":
            # A send cut short by a restart: its outcome is unknown, and sending it again
            # could deliver the SMS twice, so the server must not retry it either.
            error = "send interrupted by an agent restart; not sent again"
            with self.ledger.atomic():
                self.ledger.record(
                    message_id, "failed", error, attempt=attempt, retryable=False
                )
                self._report(
                    message_id,
                    "failed",
                    error,
                    attempt=attempt,
                    retryable=False,
                    resent=True,
                )
            return
        # Under a newer attempt too: an SMS that went out under an earlier attempt is
        # reported for the current one, not sent again.
        self._report(
            message_id,
            known.status,
            known.error,
            attempt=attempt,
            retryable=known.retryable,
            resent=True,
        )

    async def _send_sms(
        self, message_id: str, task: dict[str, Any], attempt: int | None
    ) -> None:
        if not await self._claim(message_id, attempt):
            return
        self.ledger.record(message_id, "sending", attempt=attempt)

        try:
            outcome = await self.backend.send(task)
        except asyncio.CancelledError:
            self._record_cut_send(message_id, attempt)
            raise
        except Exception as error:
            outcome = SendOutcome.failed(f"backend error: {error}")
        sent = outcome.status == "sent"
        self._record_and_report(message_id, task, outcome, attempt, delivery_due=sent)
        if sent:
            await self._await_delivery(message_id, task, attempt)

    def _record_cut_send(self, message_id: str, attempt: int | None) -> None:
        """Report `failed` and retryable for a send cancelled before it returned, when
        the backend guarantees that nothing went out.

        Otherwise the record stays `sending`: the outcome is unknown, and the next start
        with the same ledger file reports the message `failed` and not retryable.
        """
        if not self.backend.unsent_when_cancelled:
            return
        with self.ledger.atomic():
            self.ledger.record(message_id, "failed", SEND_CUT_BY_STOP, attempt=attempt)
            self._report(message_id, "failed", SEND_CUT_BY_STOP, attempt=attempt)

    async def _await_delivery(
        self, message_id: str, task: dict[str, Any], attempt: int | None
    ) -> None:
        """Wait for the delivery report of a sent SMS, then record and report it.

        Until then the ledger record is `sent` with `delivery_due`, so that a cancel or a
        kill leaves the wait to the next run (see `_resume_deliveries`).
        """
        try:
            delivery = await self.backend.wait_for_delivery(task)
        except Exception as error:
            delivery = SendOutcome.failed(f"backend error: {error}")
        if delivery is None:
            self.ledger.record(message_id, "sent", attempt=attempt)
            return
        self._record_and_report(message_id, task, delivery, attempt)

    async def _claim(self, message_id: str, attempt: int | None) -> bool:
        """Report `sending` and wait for its answer; return whether to send the SMS.

        The SMS goes out only when the server's `ack` names `sending` and this attempt.
        A task that moved to another device meanwhile gets another answer, so it is
        never sent by two phones. The wait lasts across reconnects, since the report
        stays in the outbox until it is answered.
        """
        answer: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        request_id = self._report(message_id, "sending", attempt=attempt)
        self._claims[request_id] = answer
        try:
            reply = await answer
        finally:
            self._claims.pop(request_id, None)

        status = reply.get("status") if reply.get("type") == "ack" else None
        acked_attempt = reply.get("attempt")
        same_attempt = attempt is None or acked_attempt in (None, attempt)
        if status == "sending" and same_attempt:
            return True
        # Nothing was sent under this claim, so the ledger records no outcome. An `ack`
        # of `sent` or `delivered` does not mean that this phone sent the SMS: a late
        # `sent` from the phone of an earlier attempt also ends this retry that way.
        self._emit(
            "task_dropped",
            message_id=message_id,
            attempt=attempt,
            status=status,
            reason=_drop_reason(reply, status),
            error=reply.get("error"),
        )
        return False

    def _answer_claim(self, request_id: str, reply: dict[str, Any]) -> None:
        claim = self._claims.get(request_id)
        if claim is not None and not claim.done():
            claim.set_result(reply)

    def _record_and_report(
        self,
        message_id: str,
        task: dict[str, Any],
        outcome: SendOutcome,
        attempt: int | None,
        *,
        delivery_due: bool = False,
    ) -> None:
        """Record an outcome and queue its reports as one change of the ledger file.

        Written apart, a crash between the two could keep the outcome and lose the
        report. The server does not offer a `sent` task again, so nothing would then
        send its lost `delivered` report.
        """
        with self.ledger.atomic():
            self.ledger.record(
                message_id,
                outcome.status,
                outcome.error,
                attempt=attempt,
                delivery_due=delivery_due,
            )
            self._report_outcome(message_id, task, outcome, attempt)

    def _report_outcome(
        self,
        message_id: str,
        task: dict[str, Any],
        outcome: SendOutcome,
        attempt: int | None,
    ) -> None:
        """Report an outcome for the whole message, or for each part when configured."""
        parts = task.get("segments")
        if not self.config.report_parts or not isinstance(parts, int) or parts < 2:
            self._report(message_id, outcome.status, outcome.error, attempt=attempt)
            return
        for part in range(1, parts + 1):
            self._report(
                message_id,
                outcome.status,
                outcome.error,
                attempt=attempt,
                part=part,
                parts=parts,
            )

    def _report(
        self,
        message_id: str,
        status: str,
        error: str | None = None,
        *,
        attempt: int | None = None,
        retryable: bool = True,
        part: int | None = None,
        parts: int | None = None,
        resent: bool = False,
    ) -> str:
        """Queue a report; return its request_id."""
        frame: dict[str, Any] = {
            "type": "sms_report",
            "message_id": message_id,
            "status": status,
        }
        if error is not None:
            frame["error"] = error
        if attempt is not None:
            frame["attempt"] = attempt
        if not retryable:
            frame["retryable"] = False
        if part is not None:
            frame["part"] = part
            frame["parts"] = parts
        self._emit(
            "report",
            message_id=message_id,
            status=status,
            error=error,
            attempt=attempt,
            part=part,
            resent=resent,
        )
        return self._queue(frame)

    # Outbox.

    def _queue(self, frame: dict[str, Any]) -> str:
        request_id = uuid.uuid4().hex
        entry = {**frame, "request_id": request_id}
        self._outbox[request_id] = entry
        # A `sending` claim is not kept, because after a restart the server offers its
        # task again and the agent claims it anew.
        if frame["type"] != "sms_report" or frame["status"] != "sending":
            self.ledger.keep_frame(request_id, entry)
        if self.registered.is_set():
            self._send_outbox_item(request_id)
        return request_id

    def _flush_outbox(self) -> None:
        for request_id in list(self._outbox):
            self._send_outbox_item(request_id)

    def _send_outbox_item(self, request_id: str) -> None:
        """Queue an outbox entry for the writer, unless it already waits there.

        A frame lost with the connection stays in the outbox and goes again after the
        reconnect.
        """
        outgoing = self._outgoing
        if outgoing is None or request_id not in self._outbox:
            return
        if request_id in self._queued_request_ids:
            return
        self._queued_request_ids.add(request_id)
        outgoing.put_nowait(_Outgoing(request_id=request_id))

    async def _resend_forever(self, socket: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.config.resend_after_s / 2)
            if not self.registered.is_set():
                continue
            now_s = asyncio.get_running_loop().time()
            for request_id in list(self._outbox):
                sent_at_s = self._sent_at_s.get(request_id)
                if sent_at_s is None or now_s - sent_at_s >= self.config.resend_after_s:
                    self._send_outbox_item(request_id)

    # Heartbeat.

    async def _ping_forever(self, socket: ClientConnection) -> None:
        # The register ack may change the interval, so the schedule starts after it. A hub
        # that never acknowledges the register is treated like one that misses a pong.
        try:
            async with asyncio.timeout(self.config.pong_timeout_s):
                await self.registered.wait()
        except TimeoutError:
            self._emit("error", error="register_timeout", message="no register ack")
            await socket.close(1001, "no register ack from server")
            return

        while True:
            await asyncio.sleep(self._ping_interval_s)
            self._pong_waiter = asyncio.get_running_loop().create_future()
            # Returns once the ping is written, so a long queue of frames before it
            # does not count toward the pong timeout.
            await self._send({"type": "ping"})
            try:
                async with asyncio.timeout(self.config.pong_timeout_s):
                    await self._pong_waiter
            except TimeoutError:
                self._emit(
                    "error", error="pong_timeout", message="no pong, reconnecting"
                )
                await socket.close(1001, "no pong from server")
                return

    # Writing.

    async def _send(self, frame: dict[str, Any]) -> None:
        """Queue a frame behind those already queued and wait until it is written.

        Raises ConnectionClosed when the connection closes before the frame is written.
        """
        outgoing = self._outgoing
        if outgoing is None:
            raise RuntimeError("no connection to send the frame on")
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        outgoing.put_nowait(_Outgoing(frame=frame, written=written))
        await written

    async def _write_forever(
        self,
        socket: ClientConnection,
        outgoing: "asyncio.Queue[_Outgoing]",
        pacer: FramePacer,
    ) -> None:
        """Write the queued frames in order, each once the pacer has a token for it.

        This is the only place that sends frames, so `pacer` counts every one of them.
        """
        loop = asyncio.get_running_loop()
        while True:
            item = await outgoing.get()
            # A `rate_limited` error can pause the pacer during the sleep, so the delay
            # is read again after it. A token taken a moment early leaves the bucket
            # below 0, which delays the next frame by as much.
            delay_s = pacer.delay_s(loop.time())
            while delay_s > 0:
                await asyncio.sleep(delay_s)
                delay_s = pacer.delay_s(loop.time())

            frame = item.frame
            if item.request_id is not None:
                self._queued_request_ids.discard(item.request_id)
                frame = self._outbox.get(item.request_id)
                if frame is None:
                    # Acknowledged, or dropped after a permanent error, while it waited.
                    continue
                self._sent_at_s[item.request_id] = loop.time()

            pacer.take(loop.time())
            try:
                await socket.send(orjson.dumps(frame).decode())
            except ConnectionClosed as closed:
                _fail_waiters(item, outgoing, closed)
                return
            except Exception as error:
                # The frame is lost, but an outbox entry goes again after
                # resend_after_s; the writer keeps serving the frames behind it.
                self._emit("error", error="send_failed", message=repr(error))
                if item.written is not None and not item.written.done():
                    item.written.set_exception(error)
                continue
            if item.written is not None and not item.written.done():
                item.written.set_result(None)

    def _emit(self, event_name: str, /, **fields: Any) -> None:
        if self._on_event is None:
            return
        # Error texts of the websockets library quote the URL, and with it the key.
        for name, value in fields.items():
            if isinstance(value, str):
                fields[name] = redact_api_key(value, self.config.api_key)
        self._on_event(make_event(event_name, **fields))


def _fail_waiters(
    item: _Outgoing, outgoing: "asyncio.Queue[_Outgoing]", error: ConnectionClosed
) -> None:
    """Raise `error` in every caller that waits for `item` or a frame queued after it."""
    waiting = [item]
    while not outgoing.empty():
        waiting.append(outgoing.get_nowait())
    for queued in waiting:
        if queued.written is not None and not queued.written.done():
            queued.written.set_exception(error)


def _rejected_fields(error: dict[str, Any]) -> tuple[str, ...]:
    """Return the names of the fields that an `error` frame of the hub rejects."""
    if isinstance(error.get("field"), str):
        return (error["field"],)
    problems = error.get("fields")
    if not isinstance(problems, list):
        return ()
    names = [
        problem["field"]
        for problem in problems
        if isinstance(problem, dict) and isinstance(problem.get("field"), str)
    ]
    return tuple(dict.fromkeys(names))


def _is_retry(known: Outcome, attempt: int | None) -> bool:
    """Tell whether a task is the server's retry of a send that failed with nothing sent."""
    if known.status != "failed" or not known.retryable or attempt is None:
        return False
    return known.attempt is None or attempt > known.attempt


def _drop_reason(reply: dict[str, Any], status: str | None) -> str:
    """Name why the server rejected a `sending` claim, for the `task_dropped` event."""
    if reply.get("type") != "ack":
        return "rejected"
    if status in ("sent", "delivered"):
        return "already_sent"
    if status in ("failed", "expired"):
        return "ended"
    return "moved"


def _has_expired(task: dict[str, Any]) -> bool:
    raw = task.get("expires_at")
    if not isinstance(raw, str):
        return False
    try:
        expires_at = datetime.fromisoformat(raw)
    except ValueError:
        return False
    if expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    return expires_at <= datetime.now(UTC)
