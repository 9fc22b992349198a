import asyncio
import uuid
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.models import (
    MessageStatus,
    MessageType,
    SMSMessage,
    User,
    WebhookConfig,
)
from mensajero_common.testing import scaled
from mensajero_common.webhook_outbox import record_message_event
from mensajero_common.webhooks import EVENT_SMS_RECEIVED

Sessions = async_sessionmaker[AsyncSession]


async def _create_rows(
    session_factory: Sessions,
) -> tuple[User, WebhookConfig, uuid.UUID]:
    """Create a user, its webhook for sms_received and an incoming message."""
    async with session_factory() as session:
        user = User(email=f"{uuid.uuid4().hex}@example.com", hashed_password="x")
        session.add(user)
        await session.flush()
        webhook = WebhookConfig(
            user_id=user.id,
            url="http://127.0.0.1:9/hook",
            secret_key="a-secret-of-sixteen-or-more",
            events=[EVENT_SMS_RECEIVED],
        )
        message = SMSMessage(
            user_id=user.id,
            type=MessageType.INCOMING,
            status=MessageStatus.RECEIVED,
            from_number="+34600000001",
            body="Hola",
        )
        session.add_all([webhook, message])
        await session.commit()
        return user, webhook, message.id


async def _record(
    session_factory: Sessions, user: User, message_id: uuid.UUID
) -> list[uuid.UUID]:
    async with session_factory() as session:
        delivery_ids = await record_message_event(
            session,
            event=EVENT_SMS_RECEIVED,
            user_id=user.id,
            message_id=message_id,
            from_number="+34600000001",
            to_number=None,
            body="Hola",
            timestamp=datetime.now(UTC),
            device_id=None,
        )
        await session.commit()
        return delivery_ids


async def _lock_waiters(session_factory: Sessions) -> int:
    async with session_factory() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return int(waiting or 0)


async def test_event_skips_webhook_deleted_meanwhile(
    session_factory: Sessions,
) -> None:
    user, webhook, message_id = await _create_rows(session_factory)

    async with session_factory() as deleter:
        await deleter.execute(
            text("DELETE FROM webhookconfig WHERE id = :id"), {"id": webhook.id}
        )
        recording = asyncio.create_task(_record(session_factory, user, message_id))
        async with asyncio.timeout(scaled(10)):
            # Lock waits show only in pg_stat_activity, which has no change notification.
            while not recording.done():
                if await _lock_waiters(session_factory) >= 1:
                    break
                await asyncio.sleep(0.01)
        await deleter.commit()
    delivery_ids = await recording

    assert delivery_ids == []
    async with session_factory() as session:
        events = await session.scalar(
            text("SELECT count(*) FROM webhookevent WHERE message_id = :id"),
            {"id": message_id},
        )
    assert events == 0
