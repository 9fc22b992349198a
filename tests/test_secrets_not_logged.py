"""No secret and no SMS body reaches the logs of a full run of the real processes.

The run signs up, fails a login, logs in, and creates a user API key. With that key it
registers a device, connects a device agent, creates a webhook with a secret, sends an
SMS and receives an incoming one. Then it changes the password, rotates the device key
and revokes the API key. Every service logs at DEBUG meanwhile. Then every log file is
searched for every password, token, key and webhook secret used, and the service logs
for both SMS bodies.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from mensajero_common.settings import Settings
from mensajero_common.testing import WebhookReceiver, free_port, scaled, serve_app

pytestmark = pytest.mark.e2e

# Characters of a key that its display prefix shows. The rest must never appear.
DISPLAYED_KEY_CHARACTERS = 12
# Length of the slices of a secret searched for, so that a truncated secret is found too.
SLICE_LENGTH = 16


@pytest.fixture
async def debug_services(
    settings: Settings,
    session_factory: async_sessionmaker[AsyncSession],
    redis: "Redis[bytes]",
    processes: ProcessGroup,
) -> AsyncIterator[RunningServices]:
    """Start the four services with DEBUG logs, on the test database and Redis prefix."""
    api_port, hub_port = free_port(), free_port()
    env = service_environment(
        settings,
        API_HOST="127.0.0.1",
        API_PORT=api_port,
        HUB_HOST="127.0.0.1",
        HUB_PORT=hub_port,
        LOG_LEVEL="DEBUG",
        WEBHOOK_RETRY_BASE_DELAY_S=0.2,
    )
    children = {
        name: await processes.start(name, [script], env) for name, script in SERVICES
    }
    api_url = f"http://127.0.0.1:{api_port}"
    async with httpx.AsyncClient(timeout=scaled(5)) as client:
        await wait_for_healthz(client, api_url, children["api"])
        await wait_for_healthz(client, f"http://127.0.0.1:{hub_port}", children["hub"])
    yield RunningServices(
        api_url=api_url,
        hub_ws_url=f"ws://127.0.0.1:{hub_port}/api/v1/android/ws",
        env=env,
        processes=processes,
        children=children,
    )


@dataclass
class UsedSecrets:
    """Every secret the run handles, by name, and the SMS bodies it sends and receives."""

    secrets: dict[str, str] = field(default_factory=dict)
    bodies: dict[str, str] = field(default_factory=dict)

    def add_key(self, name: str, key: str) -> None:
        """Add a key whose displayed prefix may appear in logs, but not the rest."""
        self.secrets[name] = key[DISPLAYED_KEY_CHARACTERS:]

    def add_token(self, name: str, token: str) -> None:
        # The signature is what makes a JWT usable, while its claims are not secret.
        self.secrets[name] = token.rsplit(".", 1)[-1]


def _slices(value: str) -> list[str]:
    if len(value) <= SLICE_LENGTH:
        return [value]
    step = SLICE_LENGTH // 2
    return [
        value[start : start + SLICE_LENGTH]
        for start in range(0, len(value) - SLICE_LENGTH + 1, step)
    ]


def _find_leaks(log_dir: Path, needles: dict[str, str], files: list[str]) -> list[str]:
    leaks = []
    for file_name in files:
        text = (log_dir / f"{file_name}.log").read_text(errors="replace")
        for name, value in needles.items():
            if any(piece in text for piece in _slices(value)):
                leaks.append(f"{name} in {file_name}.log")
    return leaks


async def _request(
    client: httpx.AsyncClient, method: str, path: str, **options: Any
) -> dict[str, Any]:
    response = await client.request(method, path, **options)
    assert response.status_code < 300, f"{method} {path}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


async def _wait_for_status(
    client: httpx.AsyncClient, headers: dict[str, str], message_id: str, status: str
) -> None:
    async with asyncio.timeout(scaled(20)):
        while True:
            data = (
                await _request(
                    client, "GET", f"/api/v1/sms/messages/{message_id}", headers=headers
                )
            )["data"]
            if data["status"] == status:
                return
            assert data["status"] not in ("failed", "expired"), data
            await asyncio.sleep(0.05)


async def _run_full_flow(
    services: RunningServices, receiver_url: str, receiver: WebhookReceiver
) -> UsedSecrets:
    used = UsedSecrets()
    email = f"secrets-{uuid.uuid4().hex[:8]}@example.com"
    used.secrets["password"] = "first passphrase kept secret"
    used.secrets["wrong password"] = "a wrong guess that is secret too"
    used.secrets["new password"] = "second passphrase kept secret"
    used.secrets["webhook secret"] = "webhook-signing-secret-0123456789"
    used.bodies["outgoing body"] = f"Outgoing text {uuid.uuid4().hex}"
    used.bodies["incoming body"] = f"Incoming text {uuid.uuid4().hex}"

    async with httpx.AsyncClient(
        base_url=services.api_url, timeout=scaled(10)
    ) as client:
        await _request(
            client,
            "POST",
            "/api/v1/users/signup",
            json={"email": email, "password": used.secrets["password"]},
        )
        wrong = await client.post(
            "/api/v1/login/access-token",
            data={"username": email, "password": used.secrets["wrong password"]},
        )
        assert wrong.status_code == 401
        token = (
            await _request(
                client,
                "POST",
                "/api/v1/login/access-token",
                data={"username": email, "password": used.secrets["password"]},
            )
        )["access_token"]
        used.add_token("first token", token)
        bearer = {"Authorization": f"Bearer {token}"}

        api_key = (
            await _request(
                client,
                "POST",
                "/api/v1/users/me/api-keys",
                json={"name": "server"},
                headers=bearer,
            )
        )["data"]
        used.add_key("user API key", api_key["api_key"])
        with_key = {"X-API-Key": api_key["api_key"]}

        device = (
            await _request(
                client,
                "POST",
                "/api/v1/sms/devices",
                json={"name": "phone"},
                headers=with_key,
            )
        )["data"]
        used.add_key("device key", device["api_key"])
        await _request(
            client,
            "POST",
            "/api/v1/sms/webhooks",
            json={
                "url": f"{receiver_url}/hook",
                "secret_key": used.secrets["webhook secret"],
                "events": ["sms_received", "sms_sent", "sms_delivered"],
            },
            headers=with_key,
        )

        # A phone aimed at the API's port by mistake: the API refuses the handshake,
        # and uvicorn logs the refused path with its query string.
        with pytest.raises(InvalidStatus):
            async with connect(
                services.api_url.replace("http://", "ws://")
                + f"/api/v1/android/ws?api_key={device['api_key']}",
                open_timeout=scaled(5),
            ):
                pass

        await services.processes.start(
            "agent",
            [
                "mensajero-agent",
                "--url",
                services.hub_ws_url,
                "--api-key",
                device["api_key"],
                "--send-delay-ms",
                "50",
                "--delivery-delay-ms",
                "50",
                "--incoming",
                f"+34600000002:{used.bodies['incoming body']}",
            ],
            services.env,
            read_stdout=True,
        )
        sent = (
            await _request(
                client,
                "POST",
                "/api/v1/sms/send",
                json={"to": "+34600000001", "body": used.bodies["outgoing body"]},
                headers=with_key,
            )
        )["data"]
        await _wait_for_status(client, with_key, sent["message_id"], "delivered")
        await receiver.wait_for(3, timeout_s=20)

        changed = (
            await _request(
                client,
                "PUT",
                "/api/v1/users/me/password",
                json={
                    "current_password": used.secrets["password"],
                    "new_password": used.secrets["new password"],
                },
                headers=bearer,
            )
        )["data"]
        used.add_token("second token", changed["access_token"])
        rotated = (
            await _request(
                client,
                "POST",
                f"/api/v1/sms/devices/{device['device_id']}/rotate-key",
                headers=with_key,
            )
        )["data"]
        used.add_key("rotated device key", rotated["api_key"])
        await _request(
            client,
            "DELETE",
            f"/api/v1/users/me/api-keys/{api_key['id']}",
            headers=with_key,
        )
    return used


async def test_full_run_logs_no_secrets(
    debug_services: RunningServices, tmp_path: Path
) -> None:
    receiver = WebhookReceiver()
    async with serve_app(receiver) as receiver_url:
        used = await _run_full_flow(debug_services, receiver_url, receiver)
    await debug_services.processes.stop_all()

    service_logs = [name for name, _ in SERVICES]
    every_log = [*service_logs, "agent"]
    log_dir = debug_services.processes.log_dir
    secret_leaks = _find_leaks(log_dir, used.secrets, every_log)
    body_leaks = _find_leaks(log_dir, used.bodies, service_logs)

    assert all((log_dir / f"{name}.log").stat().st_size > 0 for name in service_logs)
    assert any(
        used.bodies["incoming body"] in body.decode()
        for _, body, _ in receiver.requests
    )
    assert secret_leaks == []
    assert body_leaks == []


async def test_agent_with_wrong_url_logs_no_key(
    debug_services: RunningServices,
) -> None:
    # The websockets library quotes the whole URL in its errors, and the agent sends
    # the key in the URL's query.
    device_key = f"mdk_{uuid.uuid4().hex}{uuid.uuid4().hex}"
    hub_path = "/api/v1/android/ws"
    api_ws_url = debug_services.api_url.replace("http://", "ws://", 1) + hub_path
    processes = debug_services.processes
    # The API's port, as when --url names the wrong port.
    wrong_port = await processes.start(
        "agent-wrong-port",
        ["mensajero-agent", "--url", api_ws_url, "--run-for-s", "2"],
        {**debug_services.env, "MENSAJERO_DEVICE_API_KEY": device_key},
    )
    wrong_scheme = await processes.start(
        "agent-wrong-scheme",
        ["mensajero-agent", "--url", debug_services.api_url + hub_path],
        {**debug_services.env, "MENSAJERO_DEVICE_API_KEY": device_key},
    )
    async with asyncio.timeout(scaled(20)):
        await wrong_port.process.wait()
        await wrong_scheme.process.wait()
    await processes.stop_all()

    # The API's log has the request line, query included.
    logs = ["agent-wrong-port", "agent-wrong-scheme", "api"]
    leaks = _find_leaks(processes.log_dir, {"device key": device_key}, logs)
    wrong_port_log = wrong_port.log_path.read_text()
    wrong_scheme_log = wrong_scheme.log_path.read_text()

    assert wrong_port.process.returncode == 0, wrong_port_log
    assert "another service" in wrong_port_log
    assert wrong_scheme.process.returncode == 2, wrong_scheme_log
    assert "invalid --url" in wrong_scheme_log
    assert leaks == []
