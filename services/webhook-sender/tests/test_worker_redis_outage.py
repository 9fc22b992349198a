"""The real `mensajero-webhooks` process across a restart of its Redis server."""

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from test_delivery import create_user_with_webhook, delivery_state, record_incoming
from test_worker_main import _start_sender, _stop

from mensajero_common.models import WebhookDeliveryStatus
from mensajero_common.settings import Settings
from mensajero_common.testing import WebhookReceiver, free_port, scaled, serve_app


@asynccontextmanager
async def redis_server(port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run a redis-server without persistence on `port` until the block ends, so that
    stopping it loses every key, as a restart of such a server does."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed")
    process = await asyncio.create_subprocess_exec(
        executable,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    client: Redis = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        async with asyncio.timeout(scaled(10)):
            while True:
                try:
                    await client.ping()
                    break
                except RedisConnectionError:
                    await asyncio.sleep(0.05)
        yield process
    finally:
        await client.aclose()
        if process.returncode is None:
            process.terminate()
            await process.wait()


async def test_sender_survives_redis_restart(settings: Settings, session_factory):
    port = free_port()
    receiver = WebhookReceiver()
    async with serve_app(receiver) as url:
        user, _ = await create_user_with_webhook(session_factory, url, "secret")
        async with redis_server(port):
            process, _ = await _start_sender(
                settings,
                REDIS_URL=f"redis://127.0.0.1:{port}/0",
                WEBHOOK_SWEEP_INTERVAL_S="1",
            )
        try:
            # Redis is down: arq polls every 0.1 s, so 2 s is many failed polls.
            await asyncio.sleep(scaled(2))
            assert process.returncode is None
            # The same address again, with no keys: the deliveries are only in Postgres.
            async with redis_server(port):
                _, delivery_ids = await record_incoming(session_factory, user)
                await receiver.wait_for(1, timeout_s=scaled(15))
                assert process.returncode is None
                log = (await _stop(process)).decode()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    delivery, _ = await delivery_state(session_factory, delivery_ids[0])
    assert process.returncode == 0, log[-2000:]
    assert delivery.status == WebhookDeliveryStatus.SUCCEEDED
    assert "Redis is unavailable, retrying" in log
    assert "Redis is reachable again" in log
