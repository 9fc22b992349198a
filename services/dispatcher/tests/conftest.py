"""Fixtures of the dispatcher tests: a dispatcher context on the test database and Redis,
and a factory that writes users, devices and messages straight through the models."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.apikeys import generate_api_key, hash_api_key
from mensajero_common.keys import RedisKeys
from mensajero_common.models import (
    DeviceStatus,
    MessageStatus,
    MessageType,
    SMSDevice,
    SMSMessage,
    SMSMessageAttempt,
    User,
    UserPlan,
    UserQuota,
)
from mensajero_common.redis import create_redis
from mensajero_common.settings import Settings
from mensajero_common.testing import scaled
from mensajero_dispatcher.context import DispatcherContext

SessionFactory = async_sessionmaker[AsyncSession]


@pytest.fixture
async def ctx(
    settings: Settings,
    redis_keys: RedisKeys,
    session_factory: SessionFactory,
    redis: "Redis[bytes]",
) -> AsyncIterator[DispatcherContext]:
    # Depends on `redis` so that the test's keys are deleted afterwards.
    client = create_redis(settings)
    yield DispatcherContext(settings, redis_keys, session_factory, client)
    await client.aclose()


class Factory:
    def __init__(self, session_factory: SessionFactory) -> None:
        self.session_factory = session_factory

    async def user(self) -> User:
        async with self.session_factory() as session:
            user = User(email=f"{uuid.uuid4().hex}@example.com", hashed_password="x")
            session.add(user)
            await session.commit()
            return user

    async def device(
        self,
        user: User,
        *,
        status: DeviceStatus = DeviceStatus.ONLINE,
        is_active: bool = True,
        last_heartbeat: datetime | None = None,
        phone_number: str | None = None,
    ) -> SMSDevice:
        key = generate_api_key("mdk_")
        async with self.session_factory() as session:
            device = SMSDevice(
                user_id=user.id,
                name="phone",
                phone_number=phone_number,
                api_key_hash=hash_api_key(key),
                api_key_prefix=key[:12],
                status=status,
                is_active=is_active,
                last_heartbeat=last_heartbeat or datetime.now(UTC),
            )
            session.add(device)
            await session.commit()
            return device

    async def message(
        self,
        user: User,
        *,
        requested_device: SMSDevice | None = None,
        status: MessageStatus = MessageStatus.PENDING,
        device: SMSDevice | None = None,
        age_s: float = 0.0,
        body: str = "Hola",
        attempts: int | None = None,
        expires_at: datetime | None = None,
        next_attempt_at: datetime | None = None,
    ) -> SMSMessage:
        created_at = datetime.now(UTC) - timedelta(seconds=age_s)
        requested_id = requested_device.id if requested_device else None
        assigned_device = device or requested_device
        in_flight = status != MessageStatus.PENDING
        if attempts is None:
            attempts = 1 if in_flight else 0
        async with self.session_factory() as session:
            message = SMSMessage(
                user_id=user.id,
                type=MessageType.OUTGOING,
                status=status,
                to_number="+34600000001",
                body=body,
                segments=1,
                encoding="gsm7",
                requested_device_id=requested_id,
                device_id=assigned_device.id if assigned_device else None,
                created_at=created_at,
                updated_at=created_at,
                assigned_at=created_at if in_flight else None,
                sending_at=created_at if status == MessageStatus.SENDING else None,
                attempts=attempts,
                expires_at=expires_at,
                next_attempt_at=next_attempt_at,
            )
            session.add(message)
            await session.commit()
            return message

    async def quota(self, user: User, sms_sent_this_month: int = 1) -> None:
        """Give the user a quota row on the free plan with this many SMS charged."""
        async with self.session_factory() as session:
            plan_id = await session.scalar(
                select(UserPlan.id).where(UserPlan.code == "free")
            )
            session.add(
                UserQuota(
                    user_id=user.id,
                    plan_id=plan_id,
                    sms_sent_this_month=sms_sent_this_month,
                )
            )
            await session.commit()

    async def sms_sent_this_month(self, user: User) -> int:
        async with self.session_factory() as session:
            count = await session.scalar(
                select(UserQuota.sms_sent_this_month).where(
                    UserQuota.user_id == user.id
                )
            )
            assert count is not None
            return count

    async def attempts(self, message: SMSMessage) -> list[SMSMessageAttempt]:
        async with self.session_factory() as session:
            rows = await session.scalars(
                select(SMSMessageAttempt)
                .where(SMSMessageAttempt.message_id == message.id)
                .order_by(SMSMessageAttempt.attempt_number)
            )
            return list(rows)

    async def reload(self, message: SMSMessage) -> SMSMessage:
        async with self.session_factory() as session:
            loaded = await session.scalar(
                select(SMSMessage).where(SMSMessage.id == message.id)
            )
            assert loaded is not None
            return loaded

    async def reload_device(self, device: SMSDevice) -> SMSDevice:
        async with self.session_factory() as session:
            loaded = await session.get(SMSDevice, device.id)
            assert loaded is not None
            return loaded


@pytest.fixture
def factory(session_factory: SessionFactory) -> Factory:
    return Factory(session_factory)


Condition = Callable[[], Awaitable[bool]]


async def _wait_until(condition: Condition, timeout_s: float = 5.0) -> None:
    # The state lives in Postgres, which cannot notify a waiter, so this polls.
    async with asyncio.timeout(scaled(timeout_s)):
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[None]]:
    """Return a function that polls an async condition until it holds, or times out."""
    return _wait_until
