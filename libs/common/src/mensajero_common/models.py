"""SQLAlchemy models of every table, shared by all services.

Table names follow the specification (`smsdevice`, `smsmessage`, `webhookconfig`,
`userplan`, `userquota`). Relationships load with `lazy="raise"`, so every query is explicit.
"""

import uuid
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)


def _created_at() -> Mapped[datetime]:
    return mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )


def _updated_at() -> Mapped[datetime]:
    return mapped_column(
        DateTime(timezone=True),
        server_default=func.now(),
        onupdate=func.now(),
        nullable=False,
    )


class MessageStatus(StrEnum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    RECEIVED = "received"


class MessageType(StrEnum):
    OUTGOING = "outgoing"
    INCOMING = "incoming"


class DeviceStatus(StrEnum):
    REGISTERED = "registered"
    ONLINE = "online"
    OFFLINE = "offline"


class User(Base):
    __tablename__ = "user"

    id: Mapped[uuid.UUID] = _uuid_pk()
    email: Mapped[str] = mapped_column(String(255), nullable=False)
    hashed_password: Mapped[str] = mapped_column(String(255), nullable=False)
    full_name: Mapped[str | None] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("true")
    )
    is_superuser: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    # ISO 3166 region in which national phone numbers of this user are read (e.g. "MX").
    default_region: Mapped[str | None] = mapped_column(String(2))
    # Bumped when the password changes; tokens carrying an older value stop working.
    token_version: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("0")
    )
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()

    quota: Mapped["UserQuota"] = relationship(back_populates="user", lazy="raise")

    __table_args__ = (Index("uq_user_email_lower", func.lower(email), unique=True),)


class UserPlan(Base):
    __tablename__ = "userplan"

    id: Mapped[uuid.UUID] = _uuid_pk()
    # Stable machine name used by DEFAULT_PLAN and the upgrade endpoint ("free", "pro", …).
    code: Mapped[str] = mapped_column(String(50), nullable=False, unique=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False, unique=True)
    max_sms_per_month: Mapped[int] = mapped_column(Integer, nullable=False)
    max_devices: Mapped[int] = mapped_column(Integer, nullable=False)
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2), nullable=False)
    is_active: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("true")
    )
    created_at: Mapped[datetime] = _created_at()


class UserQuota(Base):
    __tablename__ = "userquota"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user.id", ondelete="CASCADE"), nullable=False, unique=True
    )
    plan_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("userplan.id"), nullable=False, index=True
    )
    sms_sent_this_month: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("0")
    )
    devices_registered: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("0")
    )
    # UTC date of the latest monthly reset; the index serves the dispatcher's reset job.
    last_reset_date: Mapped[date] = mapped_column(
        Date, nullable=False, server_default=func.current_date(), index=True
    )
    updated_at: Mapped[datetime] = _updated_at()

    user: Mapped[User] = relationship(back_populates="quota", lazy="raise")
    plan: Mapped[UserPlan] = relationship(lazy="raise")


class SMSDevice(Base):
    __tablename__ = "smsdevice"

    id: Mapped[uuid.UUID] = _uuid_pk()
    # Indexed by ix_smsdevice_user_id_created_at_id below.
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user.id", ondelete="CASCADE"), nullable=False
    )
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    phone_number: Mapped[str | None] = mapped_column(String(32))
    # SHA-256 of the device API key: keys are long random strings, so a fast hash is enough
    # and lets the hub find the device with one indexed lookup.
    api_key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    # First characters of the key, shown in listings so a user can tell keys apart.
    api_key_prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    api_key_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[DeviceStatus] = mapped_column(
        String(16),
        nullable=False,
        server_default=DeviceStatus.REGISTERED.value,
        index=True,
    )
    is_active: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("true")
    )
    last_heartbeat: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    app_version: Mapped[str | None] = mapped_column(String(64))
    protocol_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()

    __table_args__ = (
        # The keyset order of the device listing; it serves lookups by user_id too.
        Index("ix_smsdevice_user_id_created_at_id", "user_id", "created_at", "id"),
    )


class UserApiKey(Base):
    """A user's API key for server-to-server calls, sent as `X-API-Key` on the REST API."""

    __tablename__ = "userapikey"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user.id", ondelete="CASCADE"), nullable=False, index=True
    )
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    # SHA-256 of the key, like device keys: the key is 256 random bits, so a fast hash is
    # enough, and one indexed lookup finds it on every request.
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    # First characters of the key, shown in listings so a user can tell keys apart.
    key_prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set once by a revocation; the row stays so the listing shows what was revoked when.
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()


class SMSMessage(Base):
    __tablename__ = "smsmessage"

    id: Mapped[uuid.UUID] = _uuid_pk()
    # Indexed by ix_smsmessage_user_id_created_at_id below.
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user.id", ondelete="CASCADE"), nullable=False
    )
    # Indexed by ix_smsmessage_device_id_created_at_id below.
    device_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("smsdevice.id", ondelete="SET NULL")
    )
    # Set when the sender asked for this device; the dispatcher then never moves the message.
    requested_device_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    # Not indexed: with only two values, an index on it narrows no query enough to pay
    # for its writes.
    type: Mapped[MessageType] = mapped_column(String(16), nullable=False)
    # Indexed with user_id, as are the numbers, by the listing's indexes below.
    status: Mapped[MessageStatus] = mapped_column(String(16), nullable=False)
    to_number: Mapped[str | None] = mapped_column(String(32))
    from_number: Mapped[str | None] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text, nullable=False)
    segments: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("1")
    )
    encoding: Mapped[str] = mapped_column(
        String(8), nullable=False, server_default="gsm7"
    )
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("0")
    )
    # Not indexed: queries read it only on rows found by id.
    webhook_sent: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # Groups the messages of one bulk request. Indexed by ix_smsmessage_bulk_id below.
    bulk_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("smsbulktask.id", ondelete="SET NULL")
    )
    # The phone's own id for an incoming SMS, used to store an SMS uploaded twice only once.
    external_id: Mapped[str | None] = mapped_column(String(128))
    # Extra data that does not deserve a column (e.g. the phone's report details).
    meta: Mapped[dict[str, object]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    # A message not sent by then ends `expired`; its task carries it, so a phone skips it.
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # While a `pending` message waits for its next attempt: when it may be assigned again.
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the quota charge of a message that ended without any SMS going out was given
    # back; set at most once.
    quota_refunded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    assigned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sending_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_smsmessage_user_id_created_at_id", "user_id", "created_at", "id"),
        # The listing's filters of a user's messages, each read in (created_at, id) order
        # so that a page stops at its limit. Without them, a filter that matches few
        # messages walked the user's whole history (see migration 0017).
        # Only the statuses that are rare in a history and have no index of their own.
        Index(
            "ix_smsmessage_user_id_status_created_at_id_failed",
            "user_id",
            "status",
            "created_at",
            "id",
            postgresql_where=text("status IN ('failed', 'expired')"),
        ),
        Index(
            "ix_smsmessage_user_id_to_number_created_at_id",
            "user_id",
            "to_number",
            "created_at",
            "id",
        ),
        Index(
            "ix_smsmessage_user_id_from_number_created_at_id",
            "user_id",
            "from_number",
            "created_at",
            "id",
            postgresql_where=text("from_number IS NOT NULL"),
        ),
        Index(
            "ix_smsmessage_user_id_created_at_id_incoming",
            "user_id",
            "created_at",
            "id",
            postgresql_where=text("type = 'incoming'"),
        ),
        # Only the messages of bulk requests. Every change of a message writes a new
        # entry in each index that contains it, and most messages have no bulk_id.
        # The listing's device filter reads a page of one device in order.
        Index("ix_smsmessage_device_id_created_at_id", "device_id", "created_at", "id"),
        Index(
            "ix_smsmessage_bulk_id",
            "bulk_id",
            postgresql_where=text("bulk_id IS NOT NULL"),
        ),
        Index(
            "uq_smsmessage_user_id_idempotency_key",
            "user_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        Index(
            "uq_smsmessage_device_id_external_id",
            "device_id",
            "external_id",
            unique=True,
            postgresql_where=text("external_id IS NOT NULL"),
        ),
        # The dispatcher's expiry check reads only messages that can still expire.
        Index(
            "ix_smsmessage_expires_at_open",
            "expires_at",
            postgresql_where=text(
                "expires_at IS NOT NULL AND status IN ('pending', 'assigned')"
            ),
        ),
        # The recovery sweep pages through messages that are not final, oldest change first.
        # The type test removes no row (only outgoing messages are open), and no other
        # query writes it this way, so only the sweep can use this index. Others that did
        # read every pending message through it (see migration 0014).
        Index(
            "ix_smsmessage_updated_at_open",
            "updated_at",
            postgresql_where=text(
                "status IN ('pending', 'assigned', 'sending')"
                " AND (type || '') = 'outgoing'"
            ),
        ),
        # The dispatcher counts the in-flight messages of every device on each
        # assignment batch, and this index holds only those.
        Index(
            "ix_smsmessage_device_id_in_flight",
            "device_id",
            postgresql_where=text("status IN ('assigned', 'sending')"),
        ),
        # Serves the check of whether a user has waiting messages, and the read of a
        # user's pending messages oldest first, without reading the user's history.
        Index(
            "ix_smsmessage_user_id_created_at_id_waiting",
            "user_id",
            "created_at",
            "id",
            postgresql_where=text("status IN ('pending', 'assigned')"),
        ),
        # The dispatcher's sweeps page through pending messages oldest first, and each
        # page stops at its limit instead of sorting every pending message.
        Index(
            "ix_smsmessage_created_at_id_pending",
            "created_at",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_smsmessage_created_at_id_retry",
            "created_at",
            "id",
            postgresql_where=text("status = 'pending' AND next_attempt_at IS NOT NULL"),
        ),
    )


class AttemptStatus(StrEnum):
    """How one attempt of a message went, recorded in `smsmessageattempt.status`."""

    ASSIGNED = "assigned"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    # No phone acknowledged the task in time, so it went to another device.
    MOVED = "moved"
    # The phone acknowledged the task and never reported how it ended.
    NO_REPORT = "no_report"
    EXPIRED = "expired"


class SMSMessageAttempt(Base):
    """One attempt to send an outgoing message: the device it went to and how it ended.

    `attempt_number` counts from 1 and equals `smsmessage.attempts` while the attempt runs.
    """

    __tablename__ = "smsmessageattempt"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    message_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("smsmessage.id", ondelete="CASCADE"), nullable=False
    )
    attempt_number: Mapped[int] = mapped_column(Integer, nullable=False)
    device_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("smsdevice.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[AttemptStatus] = mapped_column(String(16), nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    # SMS parts the phone reported for this attempt, when it reported per part.
    parts: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
    # When the phone reported `sending`.
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("message_id", "attempt_number"),)


class SMSMessagePart(Base):
    """The latest report on one part of a multipart SMS, within one attempt."""

    __tablename__ = "smsmessagepart"

    message_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("smsmessage.id", ondelete="CASCADE"), primary_key=True
    )
    attempt_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    # 1-based, as the phone numbers the parts.
    part: Mapped[int] = mapped_column(Integer, primary_key=True)
    parts: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[MessageStatus] = mapped_column(String(16), nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = _updated_at()


class SMSBulkTask(Base):
    """One bulk send: the messages it created carry its id in `smsmessage.bulk_id`."""

    __tablename__ = "smsbulktask"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user.id", ondelete="CASCADE"), nullable=False, index=True
    )
    # The device the sender asked for, if any; not a foreign key, so it outlives the device.
    requested_device_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    # Recipients in the request, the rejected ones included.
    total_recipients: Mapped[int] = mapped_column(Integer, nullable=False)
    # Ids of the messages created, in the order of the request.
    message_ids: Mapped[list[uuid.UUID]] = mapped_column(
        ARRAY(UUID(as_uuid=True)), nullable=False
    )
    # One {"index", "number", "reason", …} object per recipient that was not sent.
    rejected: Mapped[list[dict[str, object]]] = mapped_column(
        JSONB, nullable=False, server_default=text("'[]'::jsonb")
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # SHA-256 of the request, to tell a repeat from another request with the same key.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created_at()

    __table_args__ = (
        Index(
            "uq_smsbulktask_user_id_idempotency_key",
            "user_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )


class WebhookConfig(Base):
    __tablename__ = "webhookconfig"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user.id", ondelete="CASCADE"), nullable=False, index=True
    )
    url: Mapped[str] = mapped_column(String(2048), nullable=False)
    # Kept in clear because each delivery is signed with it.
    secret_key: Mapped[str] = mapped_column(String(255), nullable=False)
    events: Mapped[list[str]] = mapped_column(ARRAY(String(32)), nullable=False)
    is_active: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("true")
    )
    # Why and when the webhook-sender deactivated the webhook by itself (a
    # DISABLED_REASONS code of mensajero_common.webhooks). Only the sender sets them, and
    # activating the webhook again through the API clears them.
    disabled_reason: Mapped[str | None] = mapped_column(String(32))
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class WebhookDeliveryStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # The webhook was disabled or deleted before the event reached it.
    CANCELLED = "cancelled"


class WebhookEvent(Base):
    """One event to notify (an outbox row), written in the transaction that caused it.

    `body` is the exact JSON sent, so that every attempt and every webhook gets the same bytes.
    """

    __tablename__ = "webhookevent"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user.id", ondelete="CASCADE"), nullable=False, index=True
    )
    message_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    event: Mapped[str] = mapped_column(String(32), nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _created_at()

    __table_args__ = (
        # One event per state change of a message, however often the phone reports it.
        Index(
            "uq_webhookevent_message_id_event",
            "message_id",
            "event",
            unique=True,
            postgresql_where=text("message_id IS NOT NULL"),
        ),
    )


class WebhookDelivery(Base):
    """The delivery of one event to one webhook, with its retry state."""

    __tablename__ = "webhookdelivery"

    id: Mapped[uuid.UUID] = _uuid_pk()
    event_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhookevent.id", ondelete="CASCADE"), nullable=False
    )
    webhook_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhookconfig.id", ondelete="CASCADE"), nullable=False
    )
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user.id", ondelete="CASCADE"), nullable=False, index=True
    )
    status: Mapped[WebhookDeliveryStatus] = mapped_column(
        String(16), nullable=False, server_default=WebhookDeliveryStatus.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("0")
    )
    # When the next attempt is due; while an attempt runs, the end of its lease.
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("event_id", "webhook_id"),
        Index("ix_webhookdelivery_webhook_id_created_at", "webhook_id", "created_at"),
        Index(
            "ix_webhookdelivery_next_attempt_at_pending",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
    )


class WebhookAttempt(Base):
    """One HTTP attempt of a delivery: its outcome, duration and the retry it scheduled."""

    __tablename__ = "webhookattempt"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhookdelivery.id", ondelete="CASCADE"), nullable=False, index=True
    )
    attempt_number: Mapped[int] = mapped_column(Integer, nullable=False)
    started_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False
    )
    duration_ms: Mapped[int] = mapped_column(Integer, nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    next_retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


__all__ = [
    "AttemptStatus",
    "Base",
    "DeviceStatus",
    "MessageStatus",
    "MessageType",
    "SMSBulkTask",
    "SMSDevice",
    "SMSMessage",
    "SMSMessageAttempt",
    "SMSMessagePart",
    "User",
    "UserApiKey",
    "UserPlan",
    "UserQuota",
    "WebhookAttempt",
    "WebhookConfig",
    "WebhookDelivery",
    "WebhookDeliveryStatus",
    "WebhookEvent",
]
