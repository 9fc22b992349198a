"""The hub's work in Postgres and Redis: authentication, presence, frames and tasks.

Nothing here knows about WebSockets: a transport calls these through a DeviceSession.
Every write commits before anything that depends on it is sent, so an `ack` always names
committed data, and Redis signals (task removal, webhook jobs, presence events) follow the
commit they describe.
"""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from arq.connections import ArqRedis
from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common import protocol, queues, webhook_outbox, webhooks
from mensajero_common.apikeys import hash_api_key
from mensajero_common.db import session_scope
from mensajero_common.keys import RedisKeys
from mensajero_common.models import MessageStatus
from mensajero_common.phone import PLUS_SIGNS, PhoneNumberError, normalize_e164
from mensajero_common.protocol import RegisterFrame, SmsIncomingFrame, SmsReportFrame
from mensajero_common.settings import Settings
from mensajero_common.text import remove_controls
from mensajero_common.throttle import FailureLimit
from mensajero_hub.core import reports, repository
from mensajero_hub.core.auth_throttle import DeviceAuthThrottle
from mensajero_hub.core.frames import (
    AuthThrottledError,
    DeviceDisabledError,
    DeviceGoneError,
    FrameRejectedError,
    InvalidApiKeyError,
)
from mensajero_hub.core.presence import ConnectionKeys, PresenceWriter
from mensajero_hub.core.report_writer import ReportWriter
from mensajero_hub.core.state import (
    TaskEntry,
    connection_key_ttl_s,
    heartbeat_touch_interval_s,
)

log = structlog.get_logger(__name__)

# Width of the smsmessage.from_number column.
MAX_NUMBER_LENGTH = 32
# The sender stored for an incoming SMS whose `from` is empty once control characters,
# bidirectional controls and surrounding whitespace are removed. Rejecting the frame
# instead would make the phone drop the SMS.
UNKNOWN_SENDER = "unknown"
# Postgres SQLSTATE of foreign_key_violation.
FOREIGN_KEY_VIOLATION = "23503"


@dataclass(slots=True)
class DeviceIdentity:
    """The device behind an authenticated connection; register updates name and number."""

    device_id: uuid.UUID
    user_id: uuid.UUID
    name: str
    phone_number: str | None
    default_region: str | None
    # The session closes the connection once the key it authenticated with expires.
    api_key_expires_at: datetime | None = None


class DeviceService:
    def __init__(
        self,
        settings: Settings,
        session_factory: async_sessionmaker[AsyncSession],
        redis: ArqRedis,
        keys: RedisKeys,
        auth_limit: FailureLimit,
    ) -> None:
        self.settings = settings
        # Shared by every session of the hub, so that no session keeps its own copy.
        self.touch_interval_s = heartbeat_touch_interval_s(
            settings.WEBSOCKET_PING_INTERVAL
        )
        self._sessions = session_factory
        self._redis = redis
        self._keys = keys
        self.connection_keys = ConnectionKeys(
            redis,
            keys,
            connection_key_ttl_s(
                settings.WEBSOCKET_HEARTBEAT_TIMEOUT, settings.WEBSOCKET_PING_INTERVAL
            ),
        )
        self.presence = PresenceWriter(
            session_factory, redis, keys, self.connection_keys
        )
        self.reports = ReportWriter(settings, session_factory, redis, keys)
        self.auth_throttle = DeviceAuthThrottle(auth_limit, redis, settings, keys)

    # Authentication and presence.

    async def authenticate(
        self, api_key: str | None, client_address: str
    ) -> DeviceIdentity:
        """Find the active device of an API key, or raise InvalidApiKeyError.

        While the client's address is past DEVICE_AUTH_FAILURES_PER_IP, raise
        AuthThrottledError without a query. Each InvalidApiKeyError counts against it.
        """
        throttled = await self.auth_throttle.check(client_address)
        if throttled is not None:
            raise AuthThrottledError(throttled.limit, throttled.retry_after_s)

        try:
            return await self._find_device(api_key)
        except InvalidApiKeyError:
            await self.auth_throttle.record_failure(client_address)
            raise

    async def _find_device(self, api_key: str | None) -> DeviceIdentity:
        if not api_key:
            raise InvalidApiKeyError("missing")

        async with self._sessions() as db:
            found = await repository.find_device_by_key_hash(db, hash_api_key(api_key))

        if found is None:
            raise InvalidApiKeyError("unknown")
        if not found.device_is_active:
            raise InvalidApiKeyError("device_inactive")
        if not found.user_is_active:
            raise InvalidApiKeyError("user_inactive")
        if found.api_key_expires_at is not None and found.api_key_expires_at <= (
            datetime.now(UTC)
        ):
            raise InvalidApiKeyError("expired")

        return DeviceIdentity(
            device_id=found.device_id,
            user_id=found.user_id,
            name=found.name,
            phone_number=found.phone_number,
            default_region=found.default_region,
            api_key_expires_at=found.api_key_expires_at,
        )

    async def go_offline(
        self,
        device_id: uuid.UUID,
        connection_id: str,
        heartbeat_at: datetime | None,
    ) -> bool:
        """Mark the device offline unless a newer connection took over; return if it did."""
        return await self.presence.mark_offline(device_id, connection_id, heartbeat_at)

    # Client frames.

    async def register(
        self, identity: DeviceIdentity, frame: RegisterFrame, connection_id: str
    ) -> DeviceIdentity:
        """Store the name, number and versions a phone sends; raise on an unreadable number.

        Raises ConnectionReplacedError, storing nothing, when the device's connection key
        names another connection. The key is read while the UPDATE holds the device's
        row lock, and a newer connection claims the key before it reads its first frame.
        So either this check finds the claim, or the newer connection's own UPDATE waits
        for this commit and writes last.
        """
        name = (frame.device_name or "").strip() or None
        phone_number = None
        raw_number = (frame.phone_number or "").strip()
        if raw_number:
            try:
                phone_number = normalize_e164(raw_number, identity.default_region)
            except PhoneNumberError as error:
                raise FrameRejectedError(
                    "invalid_phone_number",
                    request_id=frame.request_id,
                    details={"field": "phone_number"},
                    number=raw_number,
                    reason=error.reason,
                ) from None

        async def still_current() -> bool:
            try:
                current = await self.connection_keys.current(identity.device_id)
            except (RedisError, OSError) as error:
                # Without Redis no newer connection can be found, so this open one is
                # taken as the newest and its registration is stored.
                log.warning(
                    "register stored unchecked: Redis failed",
                    device_id=str(identity.device_id),
                    error=repr(error),
                )
                return True
            # A missing key (expired, or released by a newer connection that has
            # closed already) names no other connection.
            return current is None or current == connection_id

        async with self._sessions() as db:
            stored = await repository.update_registration(
                db,
                identity.device_id,
                name=name,
                phone_number=phone_number,
                app_version=(frame.app_version or "").strip() or None,
                protocol_version=frame.protocol_version,
                still_current=still_current,
            )
        if stored is None:
            raise DeviceGoneError(str(identity.device_id))
        identity.name, identity.phone_number = stored
        return identity

    async def apply_report(
        self, identity: DeviceIdentity, frame: SmsReportFrame
    ) -> reports.ReportOutcome:
        """Apply a status report forward-only; return the message's status afterwards.

        Raises FrameRejectedError(report_not_allowed) when the message is not an outgoing
        message assigned to this device. A repeated or late report changes nothing. The
        rules, retries and part reports included, are in mensajero_hub.core.reports.
        """
        return await self.reports.apply(identity.device_id, frame)

    async def store_incoming(
        self, identity: DeviceIdentity, frame: SmsIncomingFrame
    ) -> uuid.UUID:
        """Store an incoming SMS once per `sms_id`; return its message id after the commit.

        Raises DeviceDisabledError when the device or its account is disabled, and
        DeviceGoneError when the device is deleted, without storing anything.
        """
        from_number = self._read_sender(frame)
        received_at = frame.timestamp or datetime.now(UTC)
        if received_at.tzinfo is None:
            received_at = received_at.replace(tzinfo=UTC)

        try:
            message_id, delivery_ids = await self._insert_incoming(
                identity, frame, from_number, received_at
            )
        except IntegrityError as error:
            if getattr(error.orig, "sqlstate", None) == FOREIGN_KEY_VIOLATION:
                # The message's device_id names a device row that is gone.
                raise DeviceGoneError(str(identity.device_id)) from error
            raise

        await self._queue_webhooks(delivery_ids)
        return message_id

    async def _insert_incoming(
        self,
        identity: DeviceIdentity,
        frame: SmsIncomingFrame,
        from_number: str,
        received_at: datetime,
    ) -> tuple[uuid.UUID, list[uuid.UUID]]:
        """Store an incoming SMS and its webhook deliveries in one transaction."""
        delivery_ids: list[uuid.UUID] = []
        async with session_scope(self._sessions) as db:
            rejection = await repository.lock_device_owner(db, identity.device_id)
            if rejection == "deleted":
                raise DeviceGoneError(str(identity.device_id))
            if rejection is not None:
                raise DeviceDisabledError(rejection)
            message_id = await repository.insert_incoming(
                db,
                device_id=identity.device_id,
                user_id=identity.user_id,
                from_number=from_number,
                to_number=identity.phone_number,
                body=frame.body,
                received_at=received_at,
                sms_id=frame.sms_id,
            )
            if message_id is not None:
                delivery_ids = await webhook_outbox.record_message_event(
                    db,
                    event=webhooks.EVENT_SMS_RECEIVED,
                    user_id=identity.user_id,
                    message_id=message_id,
                    from_number=from_number,
                    to_number=identity.phone_number,
                    body=frame.body,
                    timestamp=received_at,
                    device_id=identity.device_id,
                    status=MessageStatus.RECEIVED.value,
                )
            elif frame.sms_id is not None:
                # Only a frame with an sms_id can conflict: the phone uploaded it before.
                message_id = await repository.find_incoming_id(
                    db, identity.device_id, frame.sms_id
                )
            if message_id is None:
                raise RuntimeError("incoming SMS conflicted but cannot be found")
        return message_id, delivery_ids

    def _read_sender(self, frame: SmsIncomingFrame) -> str:
        """Return the sender in E.164 when it is a phone number, else as the phone sent it.

        Senders are often short codes or names ("Movistar"), which are stored unchanged,
        except that control characters and bidirectional controls are removed first.
        A sender with nothing left is UNKNOWN_SENDER.
        """
        raw = remove_controls(frame.from_).strip()
        if not raw:
            return UNKNOWN_SENDER
        try:
            # Senders are read as international numbers only: a national-looking short
            # code would otherwise be turned into some country's number.
            sender = normalize_e164(raw) if raw.startswith(PLUS_SIGNS) else raw
        except PhoneNumberError:
            sender = raw
        if not sender or len(sender) > MAX_NUMBER_LENGTH:
            raise FrameRejectedError(
                "invalid_frame",
                request_id=frame.request_id,
                reason=protocol.INVALID_FRAME_SENDER_LENGTH,
                max_length=MAX_NUMBER_LENGTH,
            )
        return sender

    async def _queue_webhooks(self, delivery_ids: list[uuid.UUID]) -> None:
        if not delivery_ids:
            return
        try:
            await webhook_outbox.queue_deliveries(self._redis, self._keys, delivery_ids)
        except RedisError:
            # The deliveries are committed; the webhook-sender's sweep sends them later.
            log.exception("queueing webhook deliveries failed", count=len(delivery_ids))

    # Tasks.

    async def read_tasks(
        self, device_id: uuid.UUID, after: bytes | None, count: int
    ) -> list[TaskEntry]:
        entries = await queues.read_device_tasks(
            self._redis, self._keys, device_id, after=after or "-", count=count
        )
        return [TaskEntry(*entry) for entry in entries]

    async def find_pushable(
        self, device_id: uuid.UUID, message_ids: set[uuid.UUID]
    ) -> dict[uuid.UUID, int]:
        async with self._sessions() as db:
            return await repository.find_pushable_message_ids(
                db, device_id, message_ids
            )

    async def drop_task_entries(
        self, device_id: uuid.UUID, stream_ids: list[bytes]
    ) -> None:
        """Delete stream entries of messages that are final or no longer this device's."""
        await self._redis.xdel(self._keys.device_tasks_stream(device_id), *stream_ids)
