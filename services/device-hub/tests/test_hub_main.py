import asyncio
import os
import signal
import sys

import httpx
from hub_helpers import create_device, open_socket, request
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, scaled

Sessions = async_sessionmaker[AsyncSession]


async def wait_healthy(base_url: str, process: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient() as client, asyncio.timeout(scaled(15)):
        while True:
            if process.returncode is not None:
                raise AssertionError("mensajero-hub exited before it answered /healthz")
            try:
                response = await client.get(f"{base_url}/healthz")
            except httpx.TransportError:
                await asyncio.sleep(0.1)
                continue
            if response.status_code == 200:
                return


async def test_hub_process_logs_without_secrets(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    device = await create_device(session_factory)
    port = free_port()
    env = {
        **os.environ,
        "ENVIRONMENT": "test",
        "DATABASE_URL": settings.DATABASE_URL,
        "REDIS_URL": settings.REDIS_URL,
        "REDIS_KEY_PREFIX": settings.REDIS_KEY_PREFIX,
        "SECRET_KEY": settings.SECRET_KEY,
        "FIRST_SUPERUSER_PASSWORD": settings.FIRST_SUPERUSER_PASSWORD,
        "HUB_PORT": str(port),
        "LOG_LEVEL": "DEBUG",
        "LOG_JSON": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mensajero_hub.main",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(base_url, process)
        async with open_socket(base_url, device.api_key) as socket:
            await request(
                socket,
                {
                    "type": "sms_incoming",
                    "from": "+34611223344",
                    "body": "cuerpo-secreto-7731",
                    "sms_id": "s1",
                },
            )
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(scaled(30)):
            _, stderr = await process.communicate()

    logs = stderr.decode()
    assert device.api_key not in logs
    assert "api_key=[redacted]" in logs
    assert "cuerpo-secreto-7731" not in logs
    assert "device connected" in logs
    assert "device disconnected" in logs
    assert "frame received" in logs
