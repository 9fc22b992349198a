"""An SMS through the real processes: API, device-hub, dispatcher, webhook-sender and a
device agent, on real Postgres, Redis and WebSockets."""

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from service_processes import Child, RunningServices

from mensajero_common.testing import scaled

pytestmark = pytest.mark.e2e

PASSWORD = "correct-horse-battery-staple"
RECIPIENT = "+34600000001"
SEND_DELAY_MS = 300
FINAL_STATUSES = ("delivered", "failed", "expired")
STATUS_ORDER = ("pending", "assigned", "sending", "sent", "delivered")


async def _sign_up(client: httpx.AsyncClient) -> dict[str, str]:
    """Create a user and return the Authorization header of its token."""
    email = f"e2e-{uuid.uuid4().hex[:12]}@example.com"
    response = await client.post(
        "/api/v1/users/signup", json={"email": email, "password": PASSWORD}
    )
    assert response.status_code in (200, 201), response.text

    response = await client.post(
        "/api/v1/login/access-token", data={"username": email, "password": PASSWORD}
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def _register_device(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> tuple[str, str]:
    response = await client.post(
        "/api/v1/sms/devices", json={"name": "e2e phone"}, headers=headers
    )
    assert response.status_code in (200, 201), response.text
    data = response.json()["data"]
    return data["device_id"], data["api_key"]


async def _start_agent(services: RunningServices, api_key: str) -> Child:
    return await services.processes.start(
        "agent",
        [
            "mensajero-agent",
            "--url",
            services.hub_ws_url,
            "--api-key",
            api_key,
            "--send-delay-ms",
            str(SEND_DELAY_MS),
        ],
        services.env,
        read_stdout=True,
    )


async def _wait_until_online(
    client: httpx.AsyncClient, headers: dict[str, str], device_id: str
) -> None:
    async with asyncio.timeout(scaled(15)):
        while True:
            response = await client.get(
                f"/api/v1/sms/devices/{device_id}", headers=headers
            )
            assert response.status_code == 200, response.text
            if response.json()["data"]["status"] == "online":
                return
            await asyncio.sleep(0.05)


def _is_task_event(line: bytes, message_id: str) -> bool:
    """Tell whether an agent output line reports receiving the task of `message_id`."""
    try:
        event: Any = json.loads(line)
    except ValueError:
        return False
    if not isinstance(event, dict):
        return False
    return event.get("event") == "task" and event.get("message_id") == message_id


async def _wait_for_task(agent: Child, message_id: str) -> float:
    """Return the loop time at which the agent printed the task of `message_id`."""
    async with asyncio.timeout(scaled(15)):
        while True:
            for arrived_at, line in agent.lines:
                if _is_task_event(line, message_id):
                    return arrived_at
            assert agent.process.returncode is None, "the agent exited"
            await asyncio.sleep(0.005)


async def _poll_until_final(
    client: httpx.AsyncClient, headers: dict[str, str], message_id: str
) -> tuple[list[str], dict[str, Any]]:
    """Poll the message until it reaches a final status, and return each status seen
    (in order) and the last response data."""
    seen: list[str] = []
    async with asyncio.timeout(scaled(20)):
        while True:
            response = await client.get(
                f"/api/v1/sms/messages/{message_id}", headers=headers
            )
            assert response.status_code == 200, response.text
            data = response.json()["data"]
            if not seen or seen[-1] != data["status"]:
                seen.append(data["status"])
            if data["status"] in FINAL_STATUSES:
                return seen, data
            await asyncio.sleep(0.02)


async def _send(
    client: httpx.AsyncClient, headers: dict[str, str], body: str
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/sms/send", json={"to": RECIPIENT, "body": body}, headers=headers
    )
    assert response.status_code in (200, 201), response.text
    payload = response.json()
    assert payload["success"] is True
    return payload["data"]


def _assert_delivered(seen: list[str], data: dict[str, Any], device_id: str) -> None:
    assert seen[-1] == "delivered", seen
    positions = [STATUS_ORDER.index(status) for status in seen]
    assert positions == sorted(positions), seen
    assert data["device_id"] == device_id
    assert data["sent_at"] is not None
    assert data["delivered_at"] is not None
    assert data["sent_at"] <= data["delivered_at"]


async def test_sms_reaches_online_device(services: RunningServices) -> None:
    async with httpx.AsyncClient(
        base_url=services.api_url, timeout=scaled(10)
    ) as client:
        headers = await _sign_up(client)
        device_id, api_key = await _register_device(client, headers)
        agent = await _start_agent(services, api_key)
        await _wait_until_online(client, headers, device_id)

        loop = asyncio.get_running_loop()
        posted_at = loop.time()
        sent = await _send(client, headers, "Hola desde la prueba de punta a punta")
        assert sent["status"] == "pending"
        assert sent["segments"] == 1
        task_arrived_at = await _wait_for_task(agent, sent["message_id"])
        seen, data = await _poll_until_final(client, headers, sent["message_id"])

    latency_s = task_arrived_at - posted_at
    print(
        f"POST /api/v1/sms/send to task printed by the agent: {latency_s * 1000:.0f} ms"
    )
    assert latency_s < scaled(5)
    _assert_delivered(seen, data, device_id)


async def test_sms_waits_for_offline_device(services: RunningServices) -> None:
    async with httpx.AsyncClient(
        base_url=services.api_url, timeout=scaled(10)
    ) as client:
        headers = await _sign_up(client)
        device_id, api_key = await _register_device(client, headers)

        sent = await _send(client, headers, "Te espero hasta que vuelvas")
        await asyncio.sleep(0.5)
        response = await client.get(
            f"/api/v1/sms/messages/{sent['message_id']}", headers=headers
        )
        assert response.json()["data"]["status"] == "pending"

        agent = await _start_agent(services, api_key)
        await _wait_for_task(agent, sent["message_id"])
        seen, data = await _poll_until_final(client, headers, sent["message_id"])

    _assert_delivered(seen, data, device_id)


async def _wait_for_status(
    client: httpx.AsyncClient, headers: dict[str, str], message_id: str, status: str
) -> None:
    async with asyncio.timeout(scaled(10)):
        while True:
            response = await client.get(
                f"/api/v1/sms/messages/{message_id}", headers=headers
            )
            assert response.status_code == 200, response.text
            if response.json()["data"]["status"] == status:
                return
            await asyncio.sleep(0.05)


async def _sms_sent_this_month(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> int:
    response = await client.get("/api/v1/sms/quota", headers=headers)
    assert response.status_code == 200, response.text
    return int(response.json()["data"]["sms_sent_this_month"])


async def test_deleted_named_device_fails_message(services: RunningServices) -> None:
    async with httpx.AsyncClient(
        base_url=services.api_url, timeout=scaled(10)
    ) as client:
        headers = await _sign_up(client)
        device_id, _ = await _register_device(client, headers)
        response = await client.post(
            "/api/v1/sms/send",
            json={"to": RECIPIENT, "body": "x", "device_id": device_id},
            headers=headers,
        )
        assert response.status_code == 201, response.text
        message_id = response.json()["data"]["message_id"]
        response = await client.post(
            "/api/v1/sms/send-bulk",
            json={"recipients": [RECIPIENT], "body": "y", "device_id": device_id},
            headers=headers,
        )
        assert response.status_code == 201, response.text
        bulk = response.json()["data"]
        [bulk_message_id] = bulk["message_ids"]
        await _wait_for_status(client, headers, message_id, "assigned")
        await _wait_for_status(client, headers, bulk_message_id, "assigned")
        assert await _sms_sent_this_month(client, headers) == 2

        response = await client.delete(
            f"/api/v1/sms/devices/{device_id}", headers=headers
        )
        assert response.status_code in (200, 204), response.text
        seen, data = await _poll_until_final(client, headers, message_id)
        await _poll_until_final(client, headers, bulk_message_id)
        sent_this_month = await _sms_sent_this_month(client, headers)
        response = await client.get(
            f"/api/v1/sms/bulk/{bulk['task_id']}", headers=headers
        )
        assert response.status_code == 200, response.text
        progress = response.json()["data"]

    assert seen == ["assigned", "failed"]
    assert data["error"] == "requested_device_deleted"
    assert data["device_id"] is None
    assert sent_this_month == 0
    assert progress["status"] == "completed"
