"""Per-connection state of one device on the hub: plain data and decisions, no I/O."""

import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from mensajero_common import jsonutil
from mensajero_common.keys import CHANNEL_TASK_PREFIX

# Consecutive rejected frames after which the hub closes the connection: a phone that keeps
# sending frames the hub cannot apply has a bug, and each rejection costs a reply.
MAX_CONSECUTIVE_ERRORS = 20
# Seconds of DEVICE_FRAMES_PER_SECOND that a connection may send at once. A phone handed a
# batch of tasks reports `sending`, `sent` and `delivered` for each, and one reconnecting
# after a network gap flushes the reports it kept, so 20 tasks make 60 frames in a burst
# plus `register` and a `ping`. Five seconds (100 frames at the default 20 per second)
# holds that with room to spare, while a phone looping on a bug still hits the limit
# within seconds.
FRAME_BURST_S = 5


class TaskEntry(NamedTuple):
    """One entry of a device's task stream."""

    stream_id: bytes
    message_id: uuid.UUID
    task: dict[str, Any]

    @property
    def attempt(self) -> int | None:
        """The attempt of the message this task belongs to; None in tasks without one."""
        attempt = self.task.get("attempt")
        return attempt if isinstance(attempt, int) else None

    def is_expired(self, now: datetime) -> bool:
        """Tell whether the task's `expires_at` has passed; a task without one never expires."""
        raw = self.task.get("expires_at")
        if not isinstance(raw, str):
            return False
        try:
            expires_at = datetime.fromisoformat(raw)
        except ValueError:
            return False
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        return expires_at <= now


class CarriedTask(NamedTuple):
    """A task that arrived on the device's channel, with the stream entry before it."""

    # Id of the entry that was last in the stream before this one; None when the
    # stream was empty.
    previous_id: bytes | None
    entry: TaskEntry


def stream_id_order(stream_id: bytes) -> tuple[int, int]:
    """Return a Redis stream id ("<milliseconds>-<sequence>") as a sortable pair."""
    milliseconds, _, sequence = stream_id.partition(b"-")
    return int(milliseconds), int(sequence)


def parse_carried_task(data: bytes) -> CarriedTask | None:
    """Parse a task message of a device channel (see CHANNEL_TASK_PREFIX); return None
    when it is malformed, so that the caller reads the stream instead."""
    try:
        previous_id, stream_id, message_id, task_json = data[
            len(CHANNEL_TASK_PREFIX) :
        ].split(b" ", 3)
        stream_id_order(stream_id)
        if previous_id != b"-":
            stream_id_order(previous_id)
        task = jsonutil.loads(task_json)
        entry = TaskEntry(stream_id, uuid.UUID(message_id.decode()), task)
    except ValueError:
        return None
    if not isinstance(task, dict):
        return None
    return CarriedTask(None if previous_id == b"-" else previous_id, entry)


@dataclass(slots=True)
class FrameBucket:
    """Token bucket of the frames one connection may send: `rate_per_s` tokens flow in
    each second up to `capacity`, and each frame takes one.

    A phone holds one connection, so this limits the device without a Redis round trip
    per frame.
    """

    rate_per_s: int
    tokens: float
    updated_at_s: float
    # Frames rejected in a row; an admitted frame resets it.
    consecutive_rejections: int = 0

    @classmethod
    def full(cls, frames_per_s: int, now_s: float) -> "FrameBucket":
        return cls(
            frames_per_s, tokens=frames_per_s * FRAME_BURST_S, updated_at_s=now_s
        )

    @property
    def capacity(self) -> int:
        # Derived rather than stored, so that each connection's bucket keeps one number
        # less.
        return self.rate_per_s * FRAME_BURST_S

    def admit(self, now_s: float) -> bool:
        """Take a token for one frame; return False, and count a rejection, if none is left."""
        elapsed_s = max(0.0, now_s - self.updated_at_s)
        self.tokens = min(self.capacity, self.tokens + elapsed_s * self.rate_per_s)
        self.updated_at_s = now_s
        if self.tokens >= 1:
            self.tokens -= 1
            self.consecutive_rejections = 0
            return True
        self.consecutive_rejections += 1
        return False

    def retry_after_s(self) -> int:
        """Return the whole seconds until the next frame would be admitted, at least 1."""
        return max(1, math.ceil((1 - self.tokens) / self.rate_per_s))


@dataclass(slots=True)
class ConnectionState:
    """What the hub remembers about one open connection of a device.

    Times ending in `_at_s` are event-loop (monotonic) seconds; `heartbeat_at` is the
    `smsdevice.last_heartbeat` value this connection wrote last, which later writes of this
    connection compare against so that they never undo a newer connection's writes.
    """

    device_id: uuid.UUID
    connection_id: str
    opened_at_s: float
    last_frame_at_s: float
    last_touch_at_s: float
    heartbeat_at: datetime | None = None
    # Stream id of the newest task entry read so far; the next read starts after it.
    read_cursor: bytes | None = None
    # message_id → attempt of every task pushed on this connection and not yet finished,
    # so that a wake never pushes the same attempt twice on one connection, while a retry
    # (a new attempt of the same message) is pushed. None while there is none, so that
    # an idle connection keeps no empty dict.
    pushed: dict[uuid.UUID, int | None] | None = None
    consecutive_errors: int = 0
    # None means no frame rate limit, for states built outside a session.
    frame_bucket: FrameBucket | None = None

    def record_frame(self, now_s: float) -> None:
        self.last_frame_at_s = now_s

    def record_success(self) -> None:
        self.consecutive_errors = 0

    def record_error(self) -> bool:
        """Count a rejected frame; return True when the connection has to be closed."""
        self.consecutive_errors += 1
        return self.consecutive_errors >= MAX_CONSECUTIVE_ERRORS

    def needs_touch(self, now_s: float, interval_s: float) -> bool:
        """Tell whether the heartbeat is due to be written again."""
        return now_s - self.last_touch_at_s >= interval_s

    def record_touch(self, now_s: float, heartbeat_at: datetime) -> None:
        self.last_touch_at_s = now_s
        self.heartbeat_at = heartbeat_at

    def advance_cursor(self, entries: list[TaskEntry]) -> None:
        if entries:
            self.read_cursor = entries[-1].stream_id

    def take_carried(self, carried: Iterable[CarriedTask]) -> list[TaskEntry] | None:
        """Return the carried entries that come after the read cursor, in stream order,
        and move the cursor past them.

        Returns None, leaving the cursor, when the stream may hold an entry that this
        connection has not read before one of them: the entry before it is newer than the
        cursor. The caller then reads the stream from the cursor instead.
        """
        cursor = self.read_cursor
        taken: list[TaskEntry] = []
        for task in carried:
            entry_order = stream_id_order(task.entry.stream_id)
            if cursor is not None and entry_order <= stream_id_order(cursor):
                # Read from the stream already.
                continue
            if task.previous_id is not None and (
                cursor is None
                or stream_id_order(task.previous_id) > stream_id_order(cursor)
            ):
                return None
            taken.append(task.entry)
            cursor = task.entry.stream_id
        self.read_cursor = cursor
        return taken

    def select_unpushed(self, entries: Iterable[TaskEntry]) -> list[TaskEntry]:
        """Return the entries whose attempt was not pushed yet, one entry per attempt."""
        selected: list[TaskEntry] = []
        seen: set[tuple[uuid.UUID, int | None]] = set()
        for entry in entries:
            key = (entry.message_id, entry.attempt)
            if self._was_pushed(entry) or key in seen:
                continue
            seen.add(key)
            selected.append(entry)
        return selected

    def mark_pushed(self, entry: TaskEntry) -> bool:
        """Record a task as pushed; return False when its attempt already was."""
        if self._was_pushed(entry):
            return False
        if self.pushed is None:
            self.pushed = {}
        self.pushed[entry.message_id] = entry.attempt
        return True

    def _was_pushed(self, entry: TaskEntry) -> bool:
        pushed = self.pushed
        return (
            pushed is not None
            and entry.message_id in pushed
            and pushed[entry.message_id] == entry.attempt
        )

    def forget(self, message_id: uuid.UUID) -> None:
        """Drop a finished task, so a connection that lives for weeks stays small."""
        if self.pushed is None:
            return
        self.pushed.pop(message_id, None)
        if not self.pushed:
            self.pushed = None

    def forget_all(self) -> None:
        self.pushed = None


def heartbeat_touch_interval_s(ping_interval_s: float) -> float:
    """Return how often a connection writes its heartbeat (Postgres and Redis).

    Phones ping every WEBSOCKET_PING_INTERVAL seconds, so one and a half intervals
    means a write on every second ping, also when a phone pings a little early or late.
    Each write refreshes a Redis key and makes a new row version of `smsdevice`, so this
    halves that work for the hub, Redis and Postgres. A live connection's
    `last_heartbeat` is then at most two and a half intervals old (one touch interval,
    then the wait for the next frame), and the dispatcher's silence check allows for it.
    """
    return ping_interval_s * 1.5


def connection_key_ttl_s(heartbeat_timeout_s: int, ping_interval_s: int) -> int:
    """Return the TTL of a device's connection key in Redis, in whole seconds.

    A live connection refreshes the key at most every touch interval while the socket may
    stay open until the heartbeat timeout after its last frame, so the key outlives the
    socket's deadline by one touch interval and never expires under a live connection.
    """
    return heartbeat_timeout_s + math.ceil(heartbeat_touch_interval_s(ping_interval_s))
