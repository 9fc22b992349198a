"""Rows the assignment reads and the decisions it takes, as plain immutable values."""

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from mensajero_common.queues import NewMessage


@dataclass(frozen=True)
class PendingMessage:
    id: uuid.UUID
    user_id: uuid.UUID
    requested_device_id: uuid.UUID | None
    to_number: str
    body: str
    segments: int
    encoding: str
    created_at: datetime
    # Attempts so far; the assignment starts attempt `attempts + 1`.
    attempts: int = 0
    expires_at: datetime | None = None
    # Devices on which an earlier attempt failed or went unacknowledged: a retry goes
    # elsewhere when the user has another device online.
    avoid_device_ids: frozenset[uuid.UUID] = frozenset()

    @classmethod
    def new(cls, message: NewMessage) -> "PendingMessage":
        """Return the message that a new-message entry carries, before any attempt."""
        return cls(
            id=message.id,
            user_id=message.user_id,
            requested_device_id=message.requested_device_id,
            to_number=message.to_number,
            body=message.body,
            segments=message.segments,
            encoding=message.encoding,
            created_at=message.created_at,
            expires_at=message.expires_at,
        )

    @property
    def task_attempt(self) -> int:
        """The attempt that assigning this message starts."""
        return self.attempts + 1

    @property
    def cursor(self) -> tuple[datetime, uuid.UUID]:
        """Position of the message in the oldest-first order that batches page through."""
        return (self.created_at, self.id)


@dataclass(frozen=True)
class OnlineDevice:
    id: uuid.UUID
    user_id: uuid.UUID
    # Messages of the device in `assigned` or `sending`, the measure of its load.
    in_flight: int


@dataclass(frozen=True)
class RequestedDevice:
    id: uuid.UUID
    user_id: uuid.UUID
    is_active: bool


@dataclass(frozen=True)
class Assignment:
    message: PendingMessage
    device_id: uuid.UUID


@dataclass(frozen=True)
class Rejection:
    message: PendingMessage
    # Stored in `smsmessage.error` and shown to the sender.
    error: str


@dataclass
class AssignmentPlan:
    assignments: list[Assignment] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    # Messages that wait: no device of the user is online with pace left, or the requested
    # one is disabled or out of pace (DEVICE_SMS_PER_MINUTE).
    waiting: list[PendingMessage] = field(default_factory=list)


@dataclass(frozen=True)
class InFlightTask:
    """An assigned or sending message, with what its task frame needs."""

    id: uuid.UUID
    device_id: uuid.UUID
    to_number: str
    body: str
    segments: int
    encoding: str
    created_at: datetime
    attempts: int = 1
    expires_at: datetime | None = None

    @property
    def task_attempt(self) -> int:
        """The attempt in progress, to which the task belongs."""
        return max(self.attempts, 1)
