"""Throttling of failed device authentications per client address: close code 4030.

Every test serves a real hub on uvicorn with real Redis and Postgres. Client addresses
differ either by the loopback address a socket connects from (127.0.0.x) or by the
X-Forwarded-For header of a connection from a trusted peer.
"""

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hub_helpers import (
    create_device,
    open_socket,
    receive,
    request,
    serve_hub,
    wait_closed,
)
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from structlog.testing import capture_logs

from mensajero_common import protocol
from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, scaled
from mensajero_hub.main import create_app

Sessions = async_sessionmaker[AsyncSession]
UNKNOWN_KEY = "mdk_this-key-was-never-issued"
# Connections of the tests come from 127.0.0.1, which the settings trust as a proxy, or
# from this address, which they do not.
UNTRUSTED_ADDRESS = "127.0.0.2"


def throttled_settings(settings: Settings, limit: str = "2/minute") -> Settings:
    return settings.model_copy(
        update={
            "DEVICE_AUTH_FAILURES_PER_IP": limit,
            "FORWARDED_ALLOW_IPS": "127.0.0.1",
        }
    )


def socket_options(
    local_address: str = "127.0.0.1", forwarded_for: str | None = None
) -> dict[str, Any]:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return {"local_addr": (local_address, 0), "additional_headers": headers}


async def rejected_connection(
    url: str, api_key: str, **options: Any
) -> tuple[dict[str, Any], int, str]:
    """Connect with a key the hub rejects and return its error frame, close code, reason."""
    async with open_socket(url, api_key, **socket_options(**options)) as socket:
        error = await receive(socket)
        code, reason = await wait_closed(socket)
    return error, code, reason


async def fail_authentication(url: str, times: int, **options: Any) -> None:
    for _ in range(times):
        _, code, _ = await rejected_connection(url, UNKNOWN_KEY, **options)
        assert code == protocol.CLOSE_INVALID_API_KEY


async def connects(url: str, api_key: str, **options: Any) -> bool:
    """Tell whether a connection with `api_key` gets a pong to its ping."""
    async with open_socket(url, api_key, **socket_options(**options)) as socket:
        reply = await request(socket, {"type": "ping"})
    return bool(reply["type"] == "pong")


def test_malformed_limit_stops_start(settings: Settings) -> None:
    broken = settings.model_copy(update={"DEVICE_AUTH_FAILURES_PER_IP": "lots"})

    with pytest.raises(ValueError, match="DEVICE_AUTH_FAILURES_PER_IP"):
        create_app(broken)


async def test_address_throttled_after_failures(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    device = await create_device(session_factory)

    async with serve_hub(throttled_settings(settings)) as url:
        await fail_authentication(url, 2)
        error, code, reason = await rejected_connection(url, UNKNOWN_KEY)
        valid_error, valid_code, _ = await rejected_connection(url, device.api_key)

    assert error["type"] == "error"
    assert error["error"] == "too_many_auth_failures"
    assert error["limit"] == "2/minute"
    assert 1 <= error["retry_after"] <= 60
    assert error["message"].startswith("Demasiadas autenticaciones fallidas")
    assert f"{error['retry_after']} s" in error["message"]
    assert code == protocol.CLOSE_AUTH_THROTTLED
    assert reason.startswith("too many failed authentications")
    assert valid_error["error"] == "too_many_auth_failures"
    assert valid_code == protocol.CLOSE_AUTH_THROTTLED


async def test_other_address_unaffected(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    device = await create_device(session_factory)

    async with serve_hub(throttled_settings(settings)) as url:
        await fail_authentication(url, 2, local_address=UNTRUSTED_ADDRESS)
        _, throttled_code, _ = await rejected_connection(
            url, UNKNOWN_KEY, local_address=UNTRUSTED_ADDRESS
        )
        other_error, other_code, _ = await rejected_connection(url, UNKNOWN_KEY)
        valid_elsewhere = await connects(url, device.api_key)

    assert throttled_code == protocol.CLOSE_AUTH_THROTTLED
    assert other_error["error"] == "invalid_api_key"
    assert other_code == protocol.CLOSE_INVALID_API_KEY
    assert valid_elsewhere is True


async def test_success_does_not_count(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    device = await create_device(session_factory)

    async with serve_hub(throttled_settings(settings)) as url:
        successes = [await connects(url, device.api_key) for _ in range(3)]
        _, first_code, _ = await rejected_connection(url, UNKNOWN_KEY)
        _, second_code, _ = await rejected_connection(url, UNKNOWN_KEY)
        _, third_code, _ = await rejected_connection(url, UNKNOWN_KEY)

    assert successes == [True, True, True]
    assert first_code == protocol.CLOSE_INVALID_API_KEY
    assert second_code == protocol.CLOSE_INVALID_API_KEY
    assert third_code == protocol.CLOSE_AUTH_THROTTLED


async def test_throttle_shared_by_hub_replicas(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    hub_settings = throttled_settings(settings)

    async with serve_hub(hub_settings) as first, serve_hub(hub_settings) as second:
        await fail_authentication(first, 2)
        _, code, _ = await rejected_connection(second, UNKNOWN_KEY)

    assert code == protocol.CLOSE_AUTH_THROTTLED


async def test_trusted_proxy_forwards_address(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    device = await create_device(session_factory)

    async with serve_hub(throttled_settings(settings)) as url:
        await fail_authentication(url, 2, forwarded_for="203.0.113.5")
        _, throttled_code, _ = await rejected_connection(
            url, UNKNOWN_KEY, forwarded_for="203.0.113.5"
        )
        # A client cannot shift the blame by writing an address of its own before the
        # one that the proxy appends: the rightmost untrusted entry counts.
        _, prepended_code, _ = await rejected_connection(
            url, UNKNOWN_KEY, forwarded_for="198.51.100.1, 203.0.113.5"
        )
        other_client = await connects(url, device.api_key, forwarded_for="203.0.113.6")
        proxy_itself = await connects(url, device.api_key)

    assert throttled_code == protocol.CLOSE_AUTH_THROTTLED
    assert prepended_code == protocol.CLOSE_AUTH_THROTTLED
    assert other_client is True
    assert proxy_itself is True


async def test_untrusted_peer_cannot_spoof_address(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    async with serve_hub(throttled_settings(settings)) as url:
        for index in range(2):
            _, code, _ = await rejected_connection(
                url,
                UNKNOWN_KEY,
                local_address=UNTRUSTED_ADDRESS,
                forwarded_for=f"203.0.113.{index + 1}",
            )
            assert code == protocol.CLOSE_INVALID_API_KEY
        _, spoofed_code, _ = await rejected_connection(
            url,
            UNKNOWN_KEY,
            local_address=UNTRUSTED_ADDRESS,
            forwarded_for="203.0.113.99",
        )

    assert spoofed_code == protocol.CLOSE_AUTH_THROTTLED


async def test_throttled_address_logged_once(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    async with serve_hub(throttled_settings(settings)) as url:
        with capture_logs() as logs:
            await fail_authentication(url, 2, forwarded_for="203.0.113.8")
            for _ in range(3):
                await rejected_connection(url, UNKNOWN_KEY, forwarded_for="203.0.113.8")

    throttled = [
        line
        for line in logs
        if line["event"] == "client address throttled after failed authentications"
    ]
    rejected = [line for line in logs if line["event"] == "connection rejected"]
    assert len(throttled) == 1
    assert throttled[0]["client_address"] == "203.0.113.8"
    assert throttled[0]["limit"] == "2/minute"
    assert throttled[0]["log_level"] == "info"
    assert [line["client_address"] for line in rejected] == ["203.0.113.8"] * 2


@contextlib.asynccontextmanager
async def private_redis() -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """Run a Redis server of the test's own on a free loopback port.

    Yields its URL and its process, which the test may terminate to take Redis down.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
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
    url = f"redis://127.0.0.1:{port}/0"
    client: Redis = Redis.from_url(url)
    try:
        async with asyncio.timeout(scaled(10)):
            while True:
                try:
                    await client.ping()
                    break
                except RedisConnectionError:
                    await asyncio.sleep(0.05)
        yield url, process
    finally:
        await client.aclose()
        if process.returncode is None:
            process.terminate()
            await process.wait()


async def test_redis_down_fails_open(
    settings: Settings, session_factory: Sessions
) -> None:
    async with private_redis() as (redis_url, redis_process):
        hub_settings = throttled_settings(settings, "1/minute").model_copy(
            update={"REDIS_URL": redis_url}
        )
        async with serve_hub(hub_settings) as url:
            redis_process.terminate()
            await redis_process.wait()
            with capture_logs() as logs:
                results = [
                    await rejected_connection(url, UNKNOWN_KEY) for _ in range(3)
                ]

    throttle_errors = [
        line
        for line in logs
        if line["log_level"] == "error"
        and line.get("throttle") == "device authentication"
    ]
    assert [error["error"] for error, _, _ in results] == ["invalid_api_key"] * 3
    assert [code for _, code, _ in results] == [protocol.CLOSE_INVALID_API_KEY] * 3
    assert len(throttle_errors) == 1
    assert throttle_errors[0]["event"] == "throttle not enforced: Redis failed"
