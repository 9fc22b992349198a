"""The `mensajero-api` process as deployments run it: uvicorn started by `main()`."""

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.settings import Settings
from mensajero_common.testing import (
    free_port,
    run_service,
    scaled,
    service_environment,
)

LOGIN_PATH = "/api/v1/login/access-token"
# A loopback address of its own for the trusted proxy, so that the test's other
# connections, from 127.0.0.1, come from an untrusted peer.
PROXY_ADDRESS = "127.0.0.2"


@pytest.fixture
async def api_url(
    settings: Settings,
    session_factory: async_sessionmaker[AsyncSession],
    redis: Redis,
) -> AsyncIterator[str]:
    """Run `mensajero-api` trusting X-Forwarded-For from PROXY_ADDRESS only."""
    port = free_port()
    env = service_environment(
        settings,
        API_PORT=str(port),
        FORWARDED_ALLOW_IPS=PROXY_ADDRESS,
        LOGIN_FAILURES_PER_IP="2/minute",
        RATE_LIMIT_ENABLED="false",
    )
    async with run_service("mensajero_api.main", port, env) as api:
        yield api.base_url


async def failed_login(
    base_url: str, local_address: str, forwarded_for: str, email: str
) -> int:
    """Log in with a wrong password from `local_address` and return the status code."""
    transport = httpx.AsyncHTTPTransport(local_address=local_address)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post(
            base_url + LOGIN_PATH,
            data={"username": email, "password": "wrong password"},
            headers={"X-Forwarded-For": forwarded_for},
        )
    return response.status_code


async def test_untrusted_peer_cannot_spoof_address(api_url: str) -> None:
    statuses = [
        await failed_login(api_url, "127.0.0.1", f"203.0.113.{index}", f"{index}@x.io")
        for index in range(1, 4)
    ]

    assert statuses == [401, 401, 429]


async def test_trusted_proxy_forwards_address(api_url: str) -> None:
    throttled = [
        await failed_login(api_url, PROXY_ADDRESS, "203.0.113.1", f"{index}@x.io")
        for index in range(1, 4)
    ]
    other_client = await failed_login(
        api_url, PROXY_ADDRESS, "203.0.113.2", "other@x.io"
    )

    assert throttled == [401, 401, 429]
    assert other_client == 401


async def test_invalid_forwarded_allow_ips_stops_start() -> None:
    # Development accepts the default secrets, so the only invalid setting is this one.
    env = {
        **os.environ,
        "ENVIRONMENT": "development",
        "API_PORT": str(free_port()),
        "FORWARDED_ALLOW_IPS": "proxy.local",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mensajero_api.main",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(scaled(30)):
        _, stderr = await process.communicate()

    assert process.returncode == 2
    assert "invalid setting FORWARDED_ALLOW_IPS" in stderr.decode()
