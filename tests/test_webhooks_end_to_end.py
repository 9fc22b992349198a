"""Webhook events through the real processes: a phone's report or incoming SMS, recorded by
the device-hub, delivered signed by the webhook-sender to a real HTTP receiver."""

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from service_processes import Child, RunningServices, wait_for_healthz

from mensajero_common.testing import WebhookReceiver, scaled, serve_app
from mensajero_common.webhooks import verify

pytestmark = pytest.mark.e2e

PASSWORD = "correct-horse-battery-staple"
INCOMING_TEXT = "Hola <b> & ñ 😀"


async def _sign_up(client: httpx.AsyncClient) -> dict[str, str]:
    email = f"hooks-{uuid.uuid4().hex[:12]}@example.com"
    response = await client.post(
        "/api/v1/users/signup", json={"email": email, "password": PASSWORD}
    )
    assert response.status_code == 201, response.text
    response = await client.post(
        "/api/v1/login/access-token", data={"username": email, "password": PASSWORD}
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


DEFAULT_EVENTS = ("sms_received", "sms_sent", "sms_delivered")


async def _upgrade_plan(
    client: httpx.AsyncClient,
    services: RunningServices,
    headers: dict[str, str],
    plan: str,
) -> None:
    """Move the user of `headers` to `plan`, as the first superuser does."""
    response = await client.post(
        "/api/v1/login/access-token",
        data={
            "username": services.env["FIRST_SUPERUSER"],
            "password": services.env["FIRST_SUPERUSER_PASSWORD"],
        },
    )
    assert response.status_code == 200, response.text
    admin = {"Authorization": f"Bearer {response.json()['access_token']}"}
    user = (await client.get("/api/v1/users/me", headers=headers)).json()["data"]
    response = await client.put(
        "/api/v1/sms/quota/upgrade",
        json={"user_id": user["id"], "plan": plan},
        headers=admin,
    )
    assert response.status_code == 200, response.text


async def _create_webhook(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    url: str,
    events: tuple[str, ...] = DEFAULT_EVENTS,
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/sms/webhooks",
        json={"url": url, "events": list(events)},
        headers=headers,
    )
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def _register_device(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    phone_number: str | None = "+34600000009",
) -> str:
    fields = {"name": "hooks phone"}
    if phone_number is not None:
        fields["phone_number"] = phone_number
    response = await client.post("/api/v1/sms/devices", json=fields, headers=headers)
    assert response.status_code == 201, response.text
    api_key: str = response.json()["data"]["api_key"]
    return api_key


async def _wait_until_online(
    client: httpx.AsyncClient, headers: dict[str, str], count: int
) -> None:
    async with asyncio.timeout(scaled(20)):
        while True:
            response = await client.get("/api/v1/sms/devices", headers=headers)
            assert response.status_code == 200, response.text
            items = response.json()["data"]["items"]
            if sum(item["status"] == "online" for item in items) >= count:
                return
            await asyncio.sleep(0.05)


async def _wait_until_final(
    client: httpx.AsyncClient, headers: dict[str, str], message_id: str
) -> dict[str, Any]:
    async with asyncio.timeout(scaled(30)):
        while True:
            response = await client.get(
                f"/api/v1/sms/messages/{message_id}", headers=headers
            )
            assert response.status_code == 200, response.text
            data: dict[str, Any] = response.json()["data"]
            if data["status"] in ("delivered", "failed", "expired"):
                return data
            await asyncio.sleep(0.05)


async def _start_agent(services: RunningServices, api_key: str, *extra: str) -> Child:
    return await services.processes.start(
        "agent",
        [
            "mensajero-agent",
            "--url",
            services.hub_ws_url,
            "--api-key",
            api_key,
            "--send-delay-ms",
            "50",
            *extra,
        ],
        services.env,
        read_stdout=True,
    )


def _events(
    receiver: WebhookReceiver,
) -> list[tuple[dict[str, str], bytes, dict[str, Any]]]:
    return [(headers, body, json.loads(body)) for headers, body, _ in receiver.requests]


async def test_incoming_and_outgoing_events_arrive_signed(
    services: RunningServices,
) -> None:
    receiver = WebhookReceiver([200])
    async with (
        serve_app(receiver) as receiver_url,
        httpx.AsyncClient(base_url=services.api_url, timeout=scaled(10)) as client,
    ):
        headers = await _sign_up(client)
        webhook = await _create_webhook(client, headers, f"{receiver_url}/hook")
        api_key = await _register_device(client, headers)
        await _start_agent(
            services, api_key, "--incoming", f"+34611223344:{INCOMING_TEXT}"
        )
        await receiver.wait_for(1, timeout_s=20)

        response = await client.post(
            "/api/v1/sms/send",
            json={"to": "+34600000001", "body": "Hola"},
            headers=headers,
        )
        assert response.status_code == 201, response.text
        message_id = response.json()["data"]["message_id"]
        await receiver.wait_for(3, timeout_s=20)
        # Time for a duplicate to show up, if the services sent one.
        await asyncio.sleep(1.0)

    events = _events(receiver)
    for event_headers, body, _ in events:
        assert verify(
            webhook["secret_key"],
            int(event_headers["x-webhook-timestamp"]),
            body,
            event_headers["x-webhook-signature"],
        )
    received = [
        payload for _, _, payload in events if payload["event"] == "sms_received"
    ]
    assert len(received) == 1
    assert received[0]["body"] == INCOMING_TEXT
    assert received[0]["from"] == "+34611223344"
    assert received[0]["to"] == "+34600000009"
    outgoing = [
        payload["event"]
        for _, _, payload in events
        if payload["message_id"] == message_id
    ]
    assert sorted(outgoing) == ["sms_delivered", "sms_sent"]


async def test_stopped_webhook_sender_delivers_after_restart(
    services: RunningServices,
) -> None:
    receiver = WebhookReceiver([200])
    await services.processes.stop(services.children["webhooks"])
    async with (
        serve_app(receiver) as receiver_url,
        httpx.AsyncClient(base_url=services.api_url, timeout=scaled(10)) as client,
    ):
        headers = await _sign_up(client)
        await _create_webhook(client, headers, f"{receiver_url}/hook")
        api_key = await _register_device(client, headers)
        agent = await _start_agent(
            services, api_key, "--incoming", "+34611223344:mientras dormías"
        )
        async with asyncio.timeout(scaled(20)):
            while not any(b'"incoming_ack"' in line for _, line in agent.lines):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert receiver.requests == []

        await services.processes.start(
            "webhooks-restarted", ["mensajero-webhooks"], services.env
        )
        await receiver.wait_for(1, timeout_s=20)

    assert json.loads(receiver.requests[0][1])["body"] == "mientras dormías"


async def test_gone_endpoint_shows_disabled_reason(services: RunningServices) -> None:
    receiver = WebhookReceiver([410])
    async with (
        serve_app(receiver) as receiver_url,
        httpx.AsyncClient(base_url=services.api_url, timeout=scaled(10)) as client,
    ):
        headers = await _sign_up(client)
        webhook = await _create_webhook(client, headers, f"{receiver_url}/hook")
        webhook_url = f"/api/v1/sms/webhooks/{webhook['id']}"
        api_key = await _register_device(client, headers)
        before_gone = datetime.now(UTC)
        await _start_agent(services, api_key, "--incoming", "+34611223344:adiós")
        await receiver.wait_for(1, timeout_s=20)

        async with asyncio.timeout(scaled(20)):
            while True:
                disabled = (await client.get(webhook_url, headers=headers)).json()
                if not disabled["data"]["is_active"]:
                    break
                await asyncio.sleep(0.05)
        listed = (await client.get("/api/v1/sms/webhooks", headers=headers)).json()
        enabled = await client.put(
            webhook_url, json={"is_active": True}, headers=headers
        )
        read_after_enabling = (await client.get(webhook_url, headers=headers)).json()

    assert webhook["disabled_reason"] is None
    assert webhook["disabled_at"] is None
    assert disabled["data"]["disabled_reason"] == "gone"
    disabled_at = datetime.fromisoformat(disabled["data"]["disabled_at"])
    assert before_gone <= disabled_at <= datetime.now(UTC)
    assert listed["data"]["items"][0]["disabled_reason"] == "gone"
    assert listed["data"]["items"][0]["disabled_at"] == disabled["data"]["disabled_at"]
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["data"]["is_active"] is True
    assert enabled.json()["data"]["disabled_reason"] is None
    assert enabled.json()["data"]["disabled_at"] is None
    assert read_after_enabling["data"]["disabled_reason"] is None


async def test_retried_message_ends_without_error(services: RunningServices) -> None:
    # The hub, which applies a phone's failure, makes the retry wait this long, time
    # for the good phone to connect. The dispatcher then avoids the failing phone.
    await services.processes.stop(services.children["hub"])
    hub = await services.processes.start(
        "hub-quick-retry",
        ["mensajero-hub"],
        {**services.env, "MESSAGE_RETRY_DELAY_S": str(scaled(3))},
    )
    async with httpx.AsyncClient(timeout=scaled(5)) as client:
        hub_url = f"http://127.0.0.1:{services.env['HUB_PORT']}"
        await wait_for_healthz(client, hub_url, hub)
    receiver = WebhookReceiver([200])
    async with (
        serve_app(receiver) as receiver_url,
        httpx.AsyncClient(base_url=services.api_url, timeout=scaled(10)) as client,
    ):
        headers = await _sign_up(client)
        # The free plan allows one device.
        await _upgrade_plan(client, services, headers, "basic")
        await _create_webhook(
            client,
            headers,
            f"{receiver_url}/hook",
            ("sms_sent", "sms_delivered", "sms_failed"),
        )
        failing_key = await _register_device(client, headers, "+34600000009")
        good_key = await _register_device(client, headers, "+34600000008")
        await _start_agent(services, failing_key, "--failure-rate", "1")
        await _wait_until_online(client, headers, 1)

        response = await client.post(
            "/api/v1/sms/send",
            json={"to": "+34600000001", "body": "Hola"},
            headers=headers,
        )
        assert response.status_code == 201, response.text
        message_id = response.json()["data"]["message_id"]
        await _start_agent(services, good_key)
        message = await _wait_until_final(client, headers, message_id)
        await receiver.wait_for(2, timeout_s=20)
        # Time for an unexpected event to show up, if the services sent one.
        await asyncio.sleep(1.0)

    assert message["status"] == "delivered"
    assert message["error"] is None
    assert message["attempts"] >= 2
    events = [payload for _, _, payload in _events(receiver)]
    assert sorted(payload["event"] for payload in events) == [
        "sms_delivered",
        "sms_sent",
    ]
    assert [payload for payload in events if "error" in payload] == []


async def test_sent_message_shows_phone_number(services: RunningServices) -> None:
    receiver = WebhookReceiver([200])
    async with (
        serve_app(receiver) as receiver_url,
        httpx.AsyncClient(base_url=services.api_url, timeout=scaled(10)) as client,
    ):
        headers = await _sign_up(client)
        await _create_webhook(client, headers, f"{receiver_url}/hook")
        # The device gets its number from the phone's `register`, not from the API.
        api_key = await _register_device(client, headers, phone_number=None)
        await _start_agent(services, api_key, "--phone", "+525512345678")
        await _wait_until_online(client, headers, 1)

        response = await client.post(
            "/api/v1/sms/send",
            json={"to": "+34600000001", "body": "Hola"},
            headers=headers,
        )
        assert response.status_code == 201, response.text
        message_id = response.json()["data"]["message_id"]
        message = await _wait_until_final(client, headers, message_id)
        await receiver.wait_for(2, timeout_s=20)
        by_sender = await client.get(
            "/api/v1/sms/messages",
            params={"phone": "+525512345678"},
            headers=headers,
        )
        by_recipient = await client.get(
            "/api/v1/sms/messages",
            params={"phone": "+34600000001"},
            headers=headers,
        )

    assert message["status"] == "delivered"
    assert message["from"] == "+525512345678"
    events = [payload for _, _, payload in _events(receiver)]
    assert sorted(payload["event"] for payload in events) == [
        "sms_delivered",
        "sms_sent",
    ]
    assert [payload["from"] for payload in events] == ["+525512345678"] * 2
    assert by_sender.status_code == 200, by_sender.text
    assert [item["id"] for item in by_sender.json()["data"]["items"]] == [message_id]
    assert [item["id"] for item in by_recipient.json()["data"]["items"]] == [message_id]
