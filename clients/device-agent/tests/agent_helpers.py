"""A real device-hub, devices and messages for the device agent's tests."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import uvicorn
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_agent import (
    Agent,
    AgentConfig,
    EventRecorder,
    MessageLedger,
    SendingBackend,
)
from mensajero_common import protocol, queues
from mensajero_common.apikeys import display_prefix, generate_api_key, hash_api_key
from mensajero_common.keys import RedisKeys
from mensajero_common.models import (
    MessageStatus,
    MessageType,
    SMSDevice,
    SMSMessage,
    User,
)
from mensajero_common.settings import Settings
from mensajero_common.testing import scaled
from mensajero_hub.main import create_app, websocket_options

Sessions = async_sessionmaker[AsyncSession]
WS_PATH = "/api/v1/android/ws"


@asynccontextmanager
async def serve_hub_on(settings: Settings, port: int) -> AsyncIterator[str]:
    """Serve a device-hub on a fixed port, so an agent can reconnect to a restarted one."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            ws="websockets-sansio",
            **websocket_options(settings),
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield f"ws://127.0.0.1:{port}{WS_PATH}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, scaled(10))


async def create_device(
    sessions: Sessions, user_id: uuid.UUID | None = None
) -> tuple[uuid.UUID, uuid.UUID, str]:
    """Create a device, and a user for it unless `user_id` is given; return the device
    id, the user id and the API key."""
    api_key = generate_api_key("mdk_")
    async with sessions() as db:
        if user_id is None:
            user = User(
                email=f"{uuid.uuid4().hex[:10]}@example.com",
                hashed_password="not-used-by-the-hub",
            )
            db.add(user)
            await db.flush()
            user_id = user.id
        device = SMSDevice(
            user_id=user_id,
            name="Agent phone",
            api_key_hash=hash_api_key(api_key),
            api_key_prefix=display_prefix(api_key),
        )
        db.add(device)
        await db.commit()
        return device.id, user_id, api_key


async def queue_message(
    sessions: Sessions,
    redis: Redis,
    keys: RedisKeys,
    device_id: uuid.UUID,
    user_id: uuid.UUID,
    body: str = "Hola",
    *,
    attempts: int = 1,
    expires_at: datetime | None = None,
    segments: int = 1,
) -> uuid.UUID:
    """Insert an assigned message and push its task, as the dispatcher does.

    `attempts` is the attempt the task starts; the last one (MESSAGE_MAX_ATTEMPTS) makes a
    failure final.
    """
    async with sessions() as db:
        message = SMSMessage(
            user_id=user_id,
            device_id=device_id,
            type=MessageType.OUTGOING.value,
            status=MessageStatus.ASSIGNED.value,
            to_number="+34600000001",
            body=body,
            segments=segments,
            encoding="gsm7",
            attempts=attempts,
            expires_at=expires_at,
        )
        db.add(message)
        await db.commit()
        await db.refresh(message)
    await push_again(redis, keys, device_id, message)
    return message.id


async def push_again(
    redis: Redis, keys: RedisKeys, device_id: uuid.UUID, message: SMSMessage
) -> None:
    frame = protocol.task_frame(
        message.id,
        message.to_number or "",
        message.body,
        segments=message.segments,
        encoding=message.encoding,
        created_at=message.created_at,
        attempt=message.attempts,
        expires_at=message.expires_at,
    )
    await queues.push_device_task(redis, keys, device_id, message.id, frame)


async def load_message(sessions: Sessions, message_id: uuid.UUID) -> SMSMessage:
    async with sessions() as db:
        return (
            await db.execute(select(SMSMessage).where(SMSMessage.id == message_id))
        ).scalar_one()


async def reset_to_assigned(sessions: Sessions, message_id: uuid.UUID) -> SMSMessage:
    """Put a message back to `assigned`, as if the phone's reports had been lost."""
    async with sessions() as db:
        await db.execute(
            update(SMSMessage)
            .where(SMSMessage.id == message_id)
            .values(status=MessageStatus.ASSIGNED.value, delivered_at=None)
        )
        await db.commit()
    return await load_message(sessions, message_id)


async def eventually(
    check: Any, timeout_s: float = 5.0, interval_s: float = 0.02
) -> None:
    """Wait until the async `check()` returns True, or fail after the timeout."""
    async with asyncio.timeout(scaled(timeout_s)):
        while not await check():  # noqa: ASYNC110 - polls the database, not an event
            await asyncio.sleep(interval_s)


@asynccontextmanager
async def running_agent(
    url: str,
    api_key: str,
    backend: SendingBackend,
    ledger: MessageLedger | None = None,
    **config: Any,
) -> AsyncIterator[tuple[Agent, EventRecorder, "asyncio.Task[None]"]]:
    """Run an agent in the background; stop it at the end."""
    recorder = EventRecorder()
    config.setdefault("backoff_initial_s", 0.05)
    config.setdefault("backoff_max_s", 0.5)
    agent = Agent(
        AgentConfig(url=url, api_key=api_key, **config),
        backend,
        on_event=recorder,
        ledger=ledger,
        seed=1,
    )
    task = asyncio.create_task(agent.run())
    try:
        yield agent, recorder, task
    finally:
        await agent.stop()
        if not task.done():
            await asyncio.wait_for(task, scaled(5))
