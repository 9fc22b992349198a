"""Fixtures of the cross-service tests: the real service processes on free ports."""

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from service_processes import (
    SERVICES,
    ProcessGroup,
    RunningServices,
    service_environment,
    wait_for_healthz,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, scaled


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[ProcessGroup]:
    group = ProcessGroup(tmp_path)
    try:
        yield group
    finally:
        await group.stop_all()
        group.print_output_tails()


@pytest.fixture
async def services(
    settings: Settings,
    session_factory: async_sessionmaker[AsyncSession],
    redis: "Redis[bytes]",
    processes: ProcessGroup,
) -> AsyncIterator[RunningServices]:
    """Start the four services on the test database and Redis prefix, healthy."""
    # `session_factory` has emptied the tables, and `redis` deletes the keys afterwards.
    api_port, hub_port = free_port(), free_port()
    dispatcher_ops_port, webhooks_ops_port = free_port(), free_port()
    env = service_environment(
        settings,
        API_HOST="127.0.0.1",
        API_PORT=api_port,
        HUB_HOST="127.0.0.1",
        HUB_PORT=hub_port,
        OPS_HOST="127.0.0.1",
        DISPATCHER_OPS_PORT=dispatcher_ops_port,
        WEBHOOKS_OPS_PORT=webhooks_ops_port,
    )
    children = {
        name: await processes.start(name, [script], env) for name, script in SERVICES
    }
    api_url = f"http://127.0.0.1:{api_port}"
    hub_url = f"http://127.0.0.1:{hub_port}"
    async with httpx.AsyncClient(timeout=scaled(5)) as client:
        await wait_for_healthz(client, api_url, children["api"])
        await wait_for_healthz(client, hub_url, children["hub"])
        await wait_for_healthz(
            client, f"http://127.0.0.1:{dispatcher_ops_port}", children["dispatcher"]
        )
        await wait_for_healthz(
            client, f"http://127.0.0.1:{webhooks_ops_port}", children["webhooks"]
        )
    yield RunningServices(
        api_url=api_url,
        hub_ws_url=f"ws://127.0.0.1:{hub_port}/api/v1/android/ws",
        env=env,
        processes=processes,
        children=children,
    )
