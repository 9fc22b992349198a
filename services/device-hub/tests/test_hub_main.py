import contextlib
from collections.abc import AsyncIterator

from hub_helpers import create_device, open_socket, receive, request, wait_closed
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common import protocol
from mensajero_common.settings import Settings
from mensajero_common.testing import (
    ServiceProcess,
    free_port,
    run_service,
    service_environment,
)

Sessions = async_sessionmaker[AsyncSession]


@contextlib.asynccontextmanager
async def hub_process(
    settings: Settings, **variables: str
) -> AsyncIterator[ServiceProcess]:
    """Run `mensajero-hub` on the test's database and Redis prefix until the block ends.

    `variables` adds settings to its environment.
    """
    port = free_port()
    env = service_environment(settings, HUB_PORT=str(port), **variables)
    async with run_service("mensajero_hub.main", port, env) as hub:
        yield hub


async def test_hub_process_logs_without_secrets(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    device = await create_device(session_factory)
    async with (
        hub_process(settings, LOG_LEVEL="DEBUG", LOG_JSON="true") as hub,
        open_socket(hub.base_url, device.api_key) as socket,
    ):
        await request(
            socket,
            {
                "type": "sms_incoming",
                "from": "+34611223344",
                "body": "cuerpo-secreto-7731",
                "sms_id": "s1",
            },
        )

    logs = hub.stderr
    assert device.api_key not in logs
    assert "api_key=[redacted]" in logs
    assert "cuerpo-secreto-7731" not in logs
    assert "device connected" in logs
    assert "device disconnected" in logs
    assert "frame received" in logs


async def rejected_close_code(
    base_url: str, local_address: str, forwarded_for: str
) -> int:
    """Connect with an unknown key and return the close code."""
    async with open_socket(
        base_url,
        "mdk_this-key-was-never-issued",
        local_addr=(local_address, 0),
        additional_headers={"X-Forwarded-For": forwarded_for},
    ) as socket:
        await receive(socket)
        code, _ = await wait_closed(socket)
    return code


async def test_hub_process_throttles_client_address(
    settings: Settings, session_factory: Sessions, redis: Redis
) -> None:
    # The proxy is 127.0.0.2, so connections from 127.0.0.1 cannot name an address.
    async with hub_process(
        settings,
        FORWARDED_ALLOW_IPS="127.0.0.2",
        DEVICE_AUTH_FAILURES_PER_IP="2/minute",
        LOG_JSON="true",
    ) as hub:
        spoofed = [
            await rejected_close_code(hub.base_url, "127.0.0.1", f"203.0.113.{index}")
            for index in range(1, 4)
        ]
        proxied = await rejected_close_code(hub.base_url, "127.0.0.2", "203.0.113.4")

    assert spoofed == [
        protocol.CLOSE_INVALID_API_KEY,
        protocol.CLOSE_INVALID_API_KEY,
        protocol.CLOSE_AUTH_THROTTLED,
    ]
    assert proxied == protocol.CLOSE_INVALID_API_KEY
    assert '"client_address": "127.0.0.1"' in hub.stderr
    assert '"client_address": "203.0.113.4"' in hub.stderr
    assert "client address throttled after failed authentications" in hub.stderr
