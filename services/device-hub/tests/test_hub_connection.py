import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from hub_helpers import (
    DeviceRecord,
    create_device,
    create_outgoing,
    eventually,
    incoming_rows,
    load_device,
    open_socket,
    receive,
    receive_type,
    request,
    send,
    serve_hub,
    wait_closed,
)
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import delete, event, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from structlog.testing import capture_logs
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

from mensajero_common import protocol, queues
from mensajero_common.db import create_engine, create_session_factory
from mensajero_common.i18n import reason_phrase
from mensajero_common.keys import CHANNEL_DISABLE, CHANNEL_REVOKE, RedisKeys
from mensajero_common.models import DeviceStatus, SMSDevice, User
from mensajero_common.settings import Settings
from mensajero_common.testing import settings_without_connections
from mensajero_hub.core import repository
from mensajero_hub.core.auth_throttle import auth_limit_from_settings
from mensajero_hub.core.frames import (
    AuthThrottledError,
    ConnectionReplacedError,
    InvalidApiKeyError,
)
from mensajero_hub.core.service import DeviceService

Sessions = async_sessionmaker[AsyncSession]
CLIENT_ADDRESS = "203.0.113.10"


async def device_events(redis: Redis, keys: RedisKeys) -> list[tuple[str, str]]:
    entries = await redis.xrange(keys.device_events_stream)
    return [
        (fields[b"device_id"].decode(), fields[b"event"].decode())
        for _, fields in entries
    ]


async def test_healthz_answers_ok(hub_url: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{hub_url}/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_other_websocket_path_rejected(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)
    url = hub_url.replace("http://", "ws://") + "/api/v1/android/other"

    with pytest.raises(InvalidStatus) as rejected:
        async with connect(f"{url}?api_key={device.api_key}"):
            pass

    assert rejected.value.response.status_code == 403


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "missing"),
        ("unknown", "unknown"),
        ("expired", "expired"),
        ("device_inactive", "device_inactive"),
        ("user_inactive", "user_inactive"),
    ],
)
async def test_connect_rejects_bad_key(
    hub_url: str, session_factory: Sessions, case: str, reason: str
) -> None:
    api_key: str | None
    if case == "missing":
        api_key = None
    elif case == "unknown":
        api_key = "mdk_this-key-was-never-issued"
    else:
        device = await create_device(
            session_factory,
            is_active=case != "device_inactive",
            user_is_active=case != "user_inactive",
            api_key_expires_at=(
                datetime.now(UTC) - timedelta(minutes=1) if case == "expired" else None
            ),
        )
        api_key = device.api_key

    async with open_socket(hub_url, api_key) as socket:
        error = await receive(socket)
        code, close_reason = await wait_closed(socket)

    assert error["type"] == "error"
    assert error["error"] == "invalid_api_key"
    assert error["reason"] == reason
    assert error["message"].startswith("La API key del dispositivo no se puede usar: ")
    assert error["message"].endswith(
        f"{reason_phrase('invalid_api_key', reason, 'es')}."
    )
    assert code == protocol.CLOSE_INVALID_API_KEY
    assert close_reason.startswith("invalid api key")


async def test_connect_marks_device_online(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, {"type": "ping"})
        row = await load_device(session_factory, device.device_id)
        connection_id = await redis.get(redis_keys.device_connection(device.device_id))
        ttl_s = await redis.ttl(redis_keys.device_connection(device.device_id))

    assert row.status == DeviceStatus.ONLINE
    assert row.last_heartbeat is not None
    assert connection_id is not None
    assert ttl_s > 0
    assert (str(device.device_id), "online") in await device_events(redis, redis_keys)


async def test_disconnect_marks_device_offline(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)
    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, {"type": "ping"})

    async def offline() -> bool:
        row = await load_device(session_factory, device.device_id)
        return bool(row.status == DeviceStatus.OFFLINE)

    await eventually(offline)
    assert await redis.get(redis_keys.device_connection(device.device_id)) is None
    assert (str(device.device_id), "offline") in await device_events(redis, redis_keys)


async def test_register_stores_fields(hub_url: str, session_factory: Sessions) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        ack = await request(
            socket,
            {
                "type": "register",
                "device_name": "  Pixel 8 de Ana ",
                "phone_number": "+34 600 12 34 56",
                "app_version": "1.4.2",
                "protocol_version": 1,
            },
        )

    row = await load_device(session_factory, device.device_id)
    assert ack["type"] == "ack"
    assert ack["of"] == "register"
    assert ack["device_id"] == str(device.device_id)
    assert ack["name"] == "Pixel 8 de Ana"
    assert ack["phone_number"] == "+34600123456"
    assert ack["protocol_version"] == protocol.PROTOCOL_VERSION
    assert ack["ping_interval_s"] == 60
    assert ack["heartbeat_timeout_s"] == 300
    assert ack["max_frames_per_s"] == 20
    assert row.name == "Pixel 8 de Ana"
    assert row.phone_number == "+34600123456"
    assert row.app_version == "1.4.2"
    assert row.protocol_version == 1


async def test_register_reads_national_number_in_user_region(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory, default_region="MX")

    async with open_socket(hub_url, device.api_key) as socket:
        ack = await request(
            socket, {"type": "register", "phone_number": "55 1234 5678"}
        )

    assert ack["phone_number"] == "+525512345678"


async def test_register_rejects_unreadable_number(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        error = await request(
            socket,
            {"type": "register", "device_name": "Otro", "phone_number": "600123456"},
        )
        ack = await request(socket, {"type": "register", "device_name": "Otro"})

    row = await load_device(session_factory, device.device_id)
    assert error["type"] == "error"
    assert error["error"] == "invalid_phone_number"
    assert error["reason"] == "missing_country_code"
    assert "600123456" in error["message"]
    assert ack["of"] == "register"
    assert ack["phone_number"] is None
    assert row.name == "Otro"
    assert row.phone_number is None


async def test_register_rejects_number_with_extension(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        error = await request(
            socket, {"type": "register", "phone_number": "+34 612 345 678 ext. 12"}
        )

    row = await load_device(session_factory, device.device_id)
    assert error["type"] == "error"
    assert error["error"] == "invalid_phone_number"
    assert error["reason"] == "has_extension"
    assert row.phone_number is None


async def test_register_keeps_stored_values_when_absent(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(
            socket,
            {"type": "register", "device_name": "A", "phone_number": "+34600123456"},
        )
        ack = await request(socket, {"type": "register"})

    assert ack["name"] == "A"
    assert ack["phone_number"] == "+34600123456"


async def test_ping_answers_pong(hub_url: str, session_factory: Sessions) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await send(socket, {"type": "ping"})
        pong = await receive(socket)
        echoed = await request(socket, {"type": "ping"})

    assert pong["type"] == "pong"
    assert "request_id" not in pong
    assert datetime.fromisoformat(pong["server_time"]) <= datetime.now(UTC)
    assert echoed["type"] == "pong"


async def test_ping_refreshes_heartbeat(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    # A ping interval of 1 s writes the heartbeat at most every 1.5 s.
    settings = settings.model_copy(update={"WEBSOCKET_PING_INTERVAL": 1})
    device = await create_device(session_factory)

    async with serve_hub(settings) as url, open_socket(url, device.api_key) as socket:
        await request(socket, {"type": "ping"})
        first = (await load_device(session_factory, device.device_id)).last_heartbeat
        await redis.expire(redis_keys.device_connection(device.device_id), 100)
        await asyncio.sleep(1.6)
        await request(socket, {"type": "ping"})

        async def heartbeat_written() -> bool:
            row = await load_device(session_factory, device.device_id)
            return bool(row.last_heartbeat != first)

        # The hub sends the pong before it writes the heartbeat.
        await eventually(heartbeat_written)
        ttl_s = await redis.ttl(redis_keys.device_connection(device.device_id))

    assert first is not None
    assert ttl_s > 100


async def test_ping_closes_connection_whose_key_was_taken(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    # A newer connection whose announcement never arrived: only the key names it.
    settings = settings.model_copy(update={"WEBSOCKET_PING_INTERVAL": 1})
    device = await create_device(session_factory)

    async with serve_hub(settings) as url, open_socket(url, device.api_key) as socket:
        await request(socket, {"type": "ping"})
        first = (await load_device(session_factory, device.device_id)).last_heartbeat
        await redis.set(redis_keys.device_connection(device.device_id), "elsewhere")
        await asyncio.sleep(1.6)
        await send(socket, {"type": "ping"})
        code, _ = await wait_closed(socket)
        row = await load_device(session_factory, device.device_id)
        connection_id = await redis.get(redis_keys.device_connection(device.device_id))

    assert code == protocol.CLOSE_REPLACED
    assert row.last_heartbeat == first
    assert row.status == DeviceStatus.ONLINE
    assert connection_id == b"elsewhere"


async def test_ping_within_interval_skips_heartbeat_write(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, {"type": "ping"})
        first = (await load_device(session_factory, device.device_id)).last_heartbeat
        await request(socket, {"type": "ping"})
        second = (await load_device(session_factory, device.device_id)).last_heartbeat

    assert first == second


async def test_revoke_closes_with_4003(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, {"type": "ping"})
        await queues.publish_device_control(
            redis, redis_keys, device.device_id, CHANNEL_REVOKE
        )
        code, _ = await wait_closed(socket)

    async def offline() -> bool:
        row = await load_device(session_factory, device.device_id)
        return bool(row.status == DeviceStatus.OFFLINE)

    assert code == protocol.CLOSE_REVOKED
    await eventually(offline)


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "register", "device_name": "Pixel 8"},
        {"type": "sms_incoming", "from": "+34611223344", "body": "Hola"},
    ],
    ids=["register", "sms_incoming"],
)
async def test_deleted_device_frame_closes_4003(
    hub_url: str, session_factory: Sessions, frame: dict[str, Any]
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, {"type": "ping"})
        # Deleted without the revoke message that the API publishes after its commit,
        # as when a frame arrives between the two.
        async with session_factory() as session:
            await session.execute(
                delete(SMSDevice).where(SMSDevice.id == device.device_id)
            )
            await session.commit()
        await send(socket, frame)
        code, _ = await wait_closed(socket)

    assert code == protocol.CLOSE_REVOKED
    assert await incoming_rows(session_factory, device.device_id) == []


async def set_device_active(
    session_factory: Sessions, device: DeviceRecord, is_active: bool
) -> None:
    async with session_factory() as session:
        await session.execute(
            update(SMSDevice)
            .where(SMSDevice.id == device.device_id)
            .values(is_active=is_active)
        )
        await session.commit()


@pytest.mark.parametrize(
    ("language", "message"),
    [
        (
            "es",
            "La API key del dispositivo no se puede usar: el dispositivo está "
            "desactivado; la misma key vuelve a funcionar cuando se active.",
        ),
        (
            "en",
            "The device API key cannot be used: the device is disabled; the same key "
            "works again once it is enabled.",
        ),
    ],
)
async def test_disable_closes_with_4001(
    hub_url: str,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    language: str,
    message: str,
) -> None:
    device = await create_device(session_factory)

    async with open_socket(
        hub_url, device.api_key, additional_headers={"Accept-Language": language}
    ) as socket:
        await request(socket, {"type": "ping"})
        await set_device_active(session_factory, device, False)
        await queues.publish_device_control(
            redis, redis_keys, device.device_id, CHANNEL_DISABLE
        )
        error = await receive_type(socket, "error")
        code, close_reason = await wait_closed(socket)

    async def offline() -> bool:
        row = await load_device(session_factory, device.device_id)
        return bool(row.status == DeviceStatus.OFFLINE)

    assert error["error"] == "invalid_api_key"
    assert error["reason"] == "device_inactive"
    assert error["message"] == message
    assert code == protocol.CLOSE_INVALID_API_KEY
    assert close_reason == "invalid api key: the device is disabled"
    await eventually(offline)


async def test_reenabled_device_keeps_key(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)
    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, {"type": "ping"})
        await set_device_active(session_factory, device, False)
        await queues.publish_device_control(
            redis, redis_keys, device.device_id, CHANNEL_DISABLE
        )
        code, _ = await wait_closed(socket)

    async with open_socket(hub_url, device.api_key) as socket:
        rejected = await receive(socket)
        rejected_code, _ = await wait_closed(socket)
    await set_device_active(session_factory, device, True)
    async with open_socket(hub_url, device.api_key) as socket:
        registered = await request(socket, {"type": "register"})

    assert code == protocol.CLOSE_INVALID_API_KEY
    assert rejected["reason"] == "device_inactive"
    assert rejected_code == protocol.CLOSE_INVALID_API_KEY
    assert registered["type"] == "ack"
    assert registered["of"] == "register"
    assert registered["device_id"] == str(device.device_id)


async def set_user_active(
    session_factory: Sessions, device: DeviceRecord, is_active: bool
) -> None:
    async with session_factory() as session:
        await session.execute(
            update(User).where(User.id == device.user_id).values(is_active=is_active)
        )
        await session.commit()


async def test_disabled_user_cannot_store_incoming(
    hub_url: str, session_factory: Sessions
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as socket:
        await request(socket, {"type": "ping"})
        await set_user_active(session_factory, device, False)
        await send(
            socket,
            {"type": "sms_incoming", "from": "+34611223344", "body": "Hola"},
        )
        error = await receive(socket)
        code, close_reason = await wait_closed(socket)
    rows = await incoming_rows(session_factory, device.device_id)

    assert error["type"] == "error"
    assert error["error"] == "invalid_api_key"
    assert error["reason"] == "user_inactive"
    assert code == protocol.CLOSE_INVALID_API_KEY
    assert close_reason == "invalid api key: the account is disabled"
    assert rows == []


@pytest.mark.parametrize(
    ("reason", "close_reason"),
    [
        ("user_inactive", "invalid api key: the account is disabled"),
        ("device_inactive", "invalid api key: the device is disabled"),
    ],
)
async def test_heartbeat_closes_disabled_connection(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    reason: str,
    close_reason: str,
) -> None:
    # A ping interval of 1 s writes the heartbeat at most every 1.5 s.
    settings = settings.model_copy(update={"WEBSOCKET_PING_INTERVAL": 1})
    device = await create_device(session_factory)

    async with serve_hub(settings) as url, open_socket(url, device.api_key) as socket:
        await request(socket, {"type": "ping"})
        if reason == "user_inactive":
            await set_user_active(session_factory, device, False)
        else:
            await set_device_active(session_factory, device, False)
        await asyncio.sleep(1.6)
        await send(socket, {"type": "ping"})
        error = await receive_type(socket, "error")
        code, received_reason = await wait_closed(socket)

    assert error["error"] == "invalid_api_key"
    assert error["reason"] == reason
    assert code == protocol.CLOSE_INVALID_API_KEY
    assert received_reason == close_reason


async def test_heartbeat_closes_deleted_user_connection(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    settings = settings.model_copy(update={"WEBSOCKET_PING_INTERVAL": 1})
    device = await create_device(session_factory)

    async with serve_hub(settings) as url, open_socket(url, device.api_key) as socket:
        await request(socket, {"type": "ping"})
        async with session_factory() as session:
            # The user's devices go with it (ON DELETE CASCADE).
            await session.execute(delete(User).where(User.id == device.user_id))
            await session.commit()
        await asyncio.sleep(1.6)
        await send(socket, {"type": "ping"})
        code, _ = await wait_closed(socket)

    assert code == protocol.CLOSE_REVOKED


async def test_second_connection_replaces_first(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    device = await create_device(session_factory)

    async with open_socket(hub_url, device.api_key) as first:
        await request(first, {"type": "ping"})
        async with open_socket(hub_url, device.api_key) as second:
            code, reason = await wait_closed(first)
            pong = await request(second, {"type": "ping"})
            await asyncio.sleep(0.1)
            row = await load_device(session_factory, device.device_id)
            connection_id = await redis.get(
                redis_keys.device_connection(device.device_id)
            )

    assert code == protocol.CLOSE_REPLACED
    assert "replaced" in reason
    assert pong["type"] == "pong"
    assert row.status == DeviceStatus.ONLINE
    assert connection_id is not None


async def test_register_storm_stores_survivor(
    hub_url: str, session_factory: Sessions
) -> None:
    """Connections of one device that register at once: the device keeps the values
    of the connection that stays open, which its ack names."""
    device = await create_device(session_factory)

    async def register(index: int, socket: ClientConnection) -> dict[str, Any] | None:
        frame = {"type": "register", "device_name": f"storm-{index}"}
        with contextlib.suppress(ConnectionClosed):
            return await request(socket, frame)
        return None

    async with contextlib.AsyncExitStack() as stack:
        sockets = await asyncio.gather(
            *(
                stack.enter_async_context(open_socket(hub_url, device.api_key))
                for _ in range(12)
            )
        )
        acks = await asyncio.gather(
            *(register(index, socket) for index, socket in enumerate(sockets))
        )

        async def one_open() -> bool:
            return sum(socket.state is State.OPEN for socket in sockets) == 1

        await eventually(one_open)
        (survivor,) = [
            i for i, socket in enumerate(sockets) if socket.state is State.OPEN
        ]
        stored_device = await load_device(session_factory, device.device_id)

    survivor_ack = acks[survivor]
    assert survivor_ack is not None
    assert survivor_ack["name"] == f"storm-{survivor}"
    assert stored_device.name == f"storm-{survivor}"


async def test_connection_on_other_hub_replaces_first(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    device = await create_device(session_factory)

    async with (
        serve_hub(settings) as hub_a,
        serve_hub(settings) as hub_b,
        open_socket(hub_a, device.api_key) as first,
    ):
        await request(first, {"type": "ping"})
        async with open_socket(hub_b, device.api_key) as second:
            code, _ = await wait_closed(first)
            pong = await request(second, {"type": "ping"})
            await asyncio.sleep(0.1)
            row = await load_device(session_factory, device.device_id)

    assert code == protocol.CLOSE_REPLACED
    assert pong["type"] == "pong"
    assert row.status == DeviceStatus.ONLINE


async def test_silent_connection_times_out(
    settings: Settings, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    settings = settings.model_copy(update={"WEBSOCKET_HEARTBEAT_TIMEOUT": 1})
    device = await create_device(session_factory)

    async with serve_hub(settings) as url, open_socket(url, device.api_key) as socket:
        started = asyncio.get_running_loop().time()
        code, reason = await wait_closed(socket, timeout_s=5)
        silent_s = asyncio.get_running_loop().time() - started

        async def offline() -> bool:
            row = await load_device(session_factory, device.device_id)
            return bool(row.status == DeviceStatus.OFFLINE)

        await eventually(offline)

    assert code == protocol.CLOSE_HEARTBEAT_TIMEOUT
    assert "heartbeat" in reason
    assert 0.9 <= silent_s < 2.5
    assert (str(device.device_id), "offline") in await device_events(redis, redis_keys)


async def test_pings_keep_connection_open(
    settings: Settings, session_factory: Sessions
) -> None:
    settings = settings.model_copy(update={"WEBSOCKET_HEARTBEAT_TIMEOUT": 1})
    device = await create_device(session_factory)

    async with serve_hub(settings) as url, open_socket(url, device.api_key) as socket:
        for _ in range(6):
            await asyncio.sleep(0.4)
            pong = await request(socket, {"type": "ping"})
            assert pong["type"] == "pong"


async def test_shutdown_closes_with_1012(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)
    task = {"type": "task", "message_id": str(message.id)}

    async with serve_hub(settings) as url:
        socket = await open_socket(url, device.api_key)
        await queues.push_device_task(
            redis, redis_keys, device.device_id, message.id, task
        )
        await receive_type(socket, "task")

    code, _ = await wait_closed(socket)
    await socket.close()
    row = await load_device(session_factory, device.device_id)
    assert code == protocol.CLOSE_SERVICE_RESTART
    assert row.status == DeviceStatus.OFFLINE
    assert await redis.xlen(redis_keys.device_tasks_stream(device.device_id)) == 1


async def test_many_disconnects_mark_all_offline(
    hub_url: str, session_factory: Sessions, redis: Redis, redis_keys: RedisKeys
) -> None:
    devices = [await create_device(session_factory) for _ in range(60)]
    sockets = [await open_socket(hub_url, device.api_key) for device in devices]
    for socket in sockets:
        await request(socket, {"type": "ping"})

    await asyncio.gather(*(socket.close() for socket in sockets))

    async def all_offline() -> bool:
        rows = [await load_device(session_factory, d.device_id) for d in devices]
        return all(row.status == DeviceStatus.OFFLINE for row in rows)

    await eventually(all_offline)
    offline_events = {
        device_id
        for device_id, event in await device_events(redis, redis_keys)
        if event == "offline"
    }
    assert offline_events == {str(device.device_id) for device in devices}


@contextlib.asynccontextmanager
async def logged_service(
    settings: Settings, redis: Redis, redis_keys: RedisKeys
) -> AsyncIterator[tuple[DeviceService, list[str]]]:
    """Yield a DeviceService on its own engine, and the first word of each statement
    that asyncpg sends for it."""
    engine = create_engine(settings, pool_size=1)
    statements: list[str] = []

    def log_statements(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(
            lambda query: statements.append(query.query.strip().split()[0])
        )

    event.listen(engine.sync_engine, "connect", log_statements)
    service = DeviceService(
        settings,
        create_session_factory(engine),
        ArqRedis(connection_pool=redis.connection_pool),
        redis_keys,
        auth_limit_from_settings(settings),
    )
    try:
        yield service, statements
    finally:
        await engine.dispose()


async def test_authentication_sends_only_select(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)

    async with logged_service(settings, redis, redis_keys) as (service, statements):
        identity = await service.authenticate(device.api_key, CLIENT_ADDRESS)

    assert identity.device_id == device.device_id
    assert identity.user_id == device.user_id
    assert statements == ["SELECT"]


async def test_throttled_authentication_sends_no_query(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    one_failure = settings.model_copy(
        update={"DEVICE_AUTH_FAILURES_PER_IP": "1/minute"}
    )

    async with logged_service(one_failure, redis, redis_keys) as (service, statements):
        with pytest.raises(InvalidApiKeyError):
            await service.authenticate("mdk_this-key-was-never-issued", CLIENT_ADDRESS)
        statements.clear()
        with pytest.raises(AuthThrottledError) as throttled:
            await service.authenticate(device.api_key, CLIENT_ADDRESS)

    assert statements == []
    assert throttled.value.limit == "1/minute"
    assert 1 <= throttled.value.retry_after_s <= 60


async def test_register_sends_update_in_transaction(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)
    frame = protocol.RegisterFrame(
        type="register", device_name="Pixel", app_version="2.0", protocol_version=1
    )

    async with logged_service(settings, redis, redis_keys) as (service, statements):
        identity = await service.authenticate(device.api_key, CLIENT_ADDRESS)
        await service.connection_keys.claim_many([(device.device_id, "first")])
        statements.clear()
        stored = await service.register(identity, frame, "first")

    assert stored.name == "Pixel"
    assert statements == ["BEGIN;", "UPDATE", "COMMIT;"]
    stored_device = await load_device(session_factory, device.device_id)
    assert stored_device.name == "Pixel"
    assert stored_device.app_version == "2.0"
    assert stored_device.protocol_version == 1


def _register_frame(name: str) -> protocol.RegisterFrame:
    return protocol.RegisterFrame(type="register", device_name=name, protocol_version=1)


async def test_replaced_connection_registers_nothing(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    device = await create_device(session_factory)

    async with logged_service(settings, redis, redis_keys) as (service, _):
        identity = await service.authenticate(device.api_key, CLIENT_ADDRESS)
        await service.connection_keys.claim_many([(device.device_id, "old")])
        await service.register(identity, _register_frame("new phone"), "old")
        # A newer connection takes over before the old one has read the announcement.
        await service.connection_keys.claim_many([(device.device_id, "new")])
        with pytest.raises(ConnectionReplacedError):
            await service.register(identity, _register_frame("stale phone"), "old")

    stored_device = await load_device(session_factory, device.device_id)
    assert stored_device.name == "new phone"


async def test_register_stored_when_redis_fails(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device = await create_device(session_factory)

    async def fail(device_id: Any) -> str | None:
        raise RedisConnectionError("Redis is down")

    async with logged_service(settings, redis, redis_keys) as (service, _):
        identity = await service.authenticate(device.api_key, CLIENT_ADDRESS)
        monkeypatch.setattr(service.connection_keys, "current", fail)
        with capture_logs() as logs:
            stored = await service.register(identity, _register_frame("Pixel"), "only")

    assert stored.name == "Pixel"
    stored_device = await load_device(session_factory, device.device_id)
    assert stored_device.name == "Pixel"
    assert [log["event"] for log in logs] == ["register stored unchecked: Redis failed"]


async def test_newer_registration_waits_and_wins(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
) -> None:
    """A newer connection that takes over after the older one's check still writes
    last: its UPDATE waits for the older one's row lock."""
    device = await create_device(session_factory)
    newer: list[asyncio.Task[Any]] = []

    async with logged_service(settings, redis, redis_keys) as (service, _):
        identity = await service.authenticate(device.api_key, CLIENT_ADDRESS)
        await service.connection_keys.claim_many([(device.device_id, "old")])
        checked = asyncio.Event()

        async def take_over_after_check() -> bool:
            await service.connection_keys.claim_many([(device.device_id, "new")])
            newer.append(
                asyncio.create_task(
                    second.register(identity, _register_frame("new phone"), "new")
                )
            )
            # Give the newer UPDATE time to reach Postgres and wait for the lock.
            await asyncio.sleep(0.2)
            assert not newer[0].done()
            checked.set()
            return True

        async with logged_service(settings, redis, redis_keys) as (second, _):
            async with session_factory() as db:
                stored = await repository.update_registration(
                    db,
                    device.device_id,
                    name="old phone",
                    phone_number=None,
                    app_version=None,
                    protocol_version=1,
                    still_current=take_over_after_check,
                )
            await newer[0]

    assert checked.is_set()
    assert stored == ("old phone", None)
    stored_device = await load_device(session_factory, device.device_id)
    assert stored_device.name == "new phone"


async def test_postgres_out_of_connections_closes_with_1013(
    settings: Settings, redis: Redis
) -> None:
    # The key lookup fails the way a server out of connections makes it fail.
    async with (
        settings_without_connections(settings) as limited,
        serve_hub(limited) as base_url,
        open_socket(base_url, "mdk_" + "a" * 40) as socket,
    ):
        code, reason = await wait_closed(socket)

    assert code == protocol.CLOSE_TRY_AGAIN_LATER
    assert reason == "database or redis unavailable, reconnect later"
