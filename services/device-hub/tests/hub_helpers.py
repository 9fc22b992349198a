"""Rows, sockets and frames for the device-hub tests."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from mensajero_common import jsonutil
from mensajero_common.apikeys import display_prefix, generate_api_key, hash_api_key
from mensajero_common.models import (
    MessageStatus,
    MessageType,
    SMSDevice,
    SMSMessage,
    User,
)
from mensajero_common.settings import Settings
from mensajero_common.testing import scaled, serve_app
from mensajero_hub.main import create_app, websocket_options

WS_PATH = "/api/v1/android/ws"


@asynccontextmanager
async def serve_hub(settings: Settings) -> AsyncIterator[str]:
    """Serve a device-hub with the uvicorn options of production and yield its base URL."""
    async with serve_app(
        create_app(settings),
        forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS,
        **websocket_options(settings),
    ) as url:
        yield url


@dataclass
class DeviceRecord:
    device_id: uuid.UUID
    user_id: uuid.UUID
    api_key: str


async def create_user(
    sessions: async_sessionmaker[AsyncSession],
    *,
    is_active: bool = True,
    default_region: str | None = None,
) -> uuid.UUID:
    async with sessions() as db:
        user = User(
            email=f"{uuid.uuid4().hex[:10]}@example.com",
            hashed_password="not-used-by-the-hub",
            is_active=is_active,
            default_region=default_region,
        )
        db.add(user)
        await db.commit()
        return user.id


async def create_device(
    sessions: async_sessionmaker[AsyncSession],
    *,
    user_id: uuid.UUID | None = None,
    is_active: bool = True,
    api_key_expires_at: datetime | None = None,
    user_is_active: bool = True,
    default_region: str | None = None,
    phone_number: str | None = None,
) -> DeviceRecord:
    if user_id is None:
        user_id = await create_user(
            sessions, is_active=user_is_active, default_region=default_region
        )
    api_key = generate_api_key("mdk_")
    async with sessions() as db:
        device = SMSDevice(
            user_id=user_id,
            name="Test phone",
            phone_number=phone_number,
            api_key_hash=hash_api_key(api_key),
            api_key_prefix=display_prefix(api_key),
            api_key_expires_at=api_key_expires_at,
            is_active=is_active,
        )
        db.add(device)
        await db.commit()
        return DeviceRecord(device.id, user_id, api_key)


async def create_outgoing(
    sessions: async_sessionmaker[AsyncSession],
    device: DeviceRecord,
    *,
    status: MessageStatus = MessageStatus.ASSIGNED,
    body: str = "Hola desde Mensajero",
    to_number: str = "+34600000001",
    attempts: int = 1,
    expires_at: datetime | None = None,
    error: str | None = None,
    from_number: str | None = None,
) -> SMSMessage:
    async with sessions() as db:
        message = SMSMessage(
            user_id=device.user_id,
            device_id=device.device_id,
            type=MessageType.OUTGOING.value,
            status=status.value,
            to_number=to_number,
            body=body,
            segments=1,
            encoding="gsm7",
            attempts=attempts,
            expires_at=expires_at,
            error=error,
            from_number=from_number,
        )
        db.add(message)
        await db.commit()
        await db.refresh(message)
        return message


async def load_message(
    sessions: async_sessionmaker[AsyncSession], message_id: uuid.UUID
) -> SMSMessage:
    async with sessions() as db:
        return (
            await db.execute(select(SMSMessage).where(SMSMessage.id == message_id))
        ).scalar_one()


async def load_device(
    sessions: async_sessionmaker[AsyncSession], device_id: uuid.UUID
) -> SMSDevice:
    async with sessions() as db:
        return (
            await db.execute(select(SMSDevice).where(SMSDevice.id == device_id))
        ).scalar_one()


async def incoming_rows(
    sessions: async_sessionmaker[AsyncSession], device_id: uuid.UUID
) -> list[SMSMessage]:
    async with sessions() as db:
        statement = (
            select(SMSMessage)
            .where(
                SMSMessage.device_id == device_id,
                SMSMessage.type == MessageType.INCOMING.value,
            )
            .order_by(SMSMessage.created_at)
        )
        return list((await db.execute(statement)).scalars().all())


def ws_url(base_url: str, api_key: str | None) -> str:
    url = base_url.replace("http://", "ws://") + WS_PATH
    return url if api_key is None else f"{url}?api_key={api_key}"


def open_socket(base_url: str, api_key: str | None, **options: Any) -> connect:
    """Open a client like a phone's: no compression, the key in the query string."""
    return connect(ws_url(base_url, api_key), compression=None, **options)


async def send(socket: ClientConnection, frame: dict[str, Any]) -> None:
    await socket.send(jsonutil.dumps_str(frame))


async def receive(socket: ClientConnection, timeout_s: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(scaled(timeout_s)):
        raw = await socket.recv()
    frame: dict[str, Any] = jsonutil.loads(raw)
    return frame


async def receive_type(
    socket: ClientConnection, frame_type: str, timeout_s: float = 5.0
) -> dict[str, Any]:
    """Return the next frame of `frame_type`, skipping others (pushed tasks, say)."""
    async with asyncio.timeout(scaled(timeout_s)):
        while True:
            frame = await receive(socket, timeout_s)
            if frame["type"] == frame_type:
                return frame


async def request(
    socket: ClientConnection, frame: dict[str, Any], timeout_s: float = 5.0
) -> dict[str, Any]:
    """Send a frame with a request_id and return the ack or error that names it."""
    request_id = uuid.uuid4().hex
    await send(socket, {**frame, "request_id": request_id})
    async with asyncio.timeout(scaled(timeout_s)):
        while True:
            reply = await receive(socket, timeout_s)
            if reply.get("request_id") == request_id:
                return reply


async def wait_closed(
    socket: ClientConnection, timeout_s: float = 5.0
) -> tuple[int, str]:
    """Read until the server closes; return its close code and reason."""
    async with asyncio.timeout(scaled(timeout_s)):
        try:
            while True:
                await socket.recv()
        except ConnectionClosed as closed:
            if closed.rcvd is None:
                raise AssertionError(
                    "connection dropped without a close frame"
                ) from closed
            return closed.rcvd.code, closed.rcvd.reason
    raise AssertionError("unreachable")


async def eventually(
    check: Any, timeout_s: float = 5.0, interval_s: float = 0.02
) -> None:
    """Wait until the async `check()` returns True, or fail after the timeout."""
    async with asyncio.timeout(scaled(timeout_s)):
        while not await check():  # noqa: ASYNC110 - polls the database, not an event
            await asyncio.sleep(interval_s)
