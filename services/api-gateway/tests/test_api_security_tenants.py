"""Tenant isolation: another user, with a valid token or API key, never reaches A's rows.

The matrix walks every route of the app that takes an id in its path, so a new endpoint
with an id is attacked as soon as it exists, and fails here until it has an owner's id to
try and, if it needs one, a valid body.
"""

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from api_test_helpers import ApiUser, MakeUser, register_device, send_sms
from fastapi import FastAPI
from httpx import AsyncClient
from security_helpers import (
    api_routes,
    body_is_required,
    create_api_key,
    key_headers,
    snapshot_rows_of,
)
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.models import SMSMessage
from mensajero_common.settings import Settings
from mensajero_common.testing import WebhookReceiver, serve_app

Sessions = async_sessionmaker[AsyncSession]

# Bodies that would succeed for the owner, so that only ownership can make them fail.
VALID_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("PUT", "/api/v1/sms/devices/{device_id}"): {
        "name": "taken over",
        "is_active": False,
    },
    ("PUT", "/api/v1/sms/webhooks/{webhook_id}"): {
        "url": "http://127.0.0.1:9/stolen",
        "is_active": False,
    },
}
PATH_PARAMETER = re.compile(r"{(\w+)}")


@dataclass
class Victim:
    user: ApiUser
    api_key: str
    ids: dict[str, str]
    receiver: WebhookReceiver


@dataclass
class Intruder:
    user: ApiUser
    api_key: str

    def credentials(self) -> dict[str, dict[str, str]]:
        return {"token": self.user.headers, "api_key": key_headers(self.api_key)}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"RATE_LIMIT_ENABLED": False})


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[WebhookReceiver, str]]:
    webhook_receiver = WebhookReceiver()
    async with serve_app(webhook_receiver) as url:
        yield webhook_receiver, url


async def _create_bulk(client: AsyncClient, owner: ApiUser) -> str:
    response = await client.post(
        "/api/v1/sms/send-bulk",
        json={"recipients": ["+525512345678", "+525512345679"], "body": "Hola"},
        headers=owner.headers,
    )
    assert response.status_code in (200, 201, 202), response.text
    return str(response.json()["data"]["task_id"])


@pytest.fixture
async def victim(
    app: FastAPI,
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: Sessions,
    receiver: tuple[WebhookReceiver, str],
) -> Victim:
    """A user with one of everything that has an id: device, message, webhook, key, bulk."""
    owner = await make_user(plan="pro")
    webhook_receiver, receiver_url = receiver
    device = await register_device(client, owner)
    sent = await send_sms(client, owner)
    assert sent.status_code == 201, sent.text
    webhook = await client.post(
        "/api/v1/sms/webhooks",
        json={"url": f"{receiver_url}/hook", "events": ["sms_received", "sms_sent"]},
        headers=owner.headers,
    )
    assert webhook.status_code == 201, webhook.text
    api_key = await create_api_key(client, owner, name="victim's server")

    ids = {
        "device_id": device["device_id"],
        "message_id": sent.json()["data"]["message_id"],
        "webhook_id": webhook.json()["data"]["id"],
        "key_id": api_key["id"],
    }
    route_parameters = {
        name for _, path, _ in api_routes(app) for name in PATH_PARAMETER.findall(path)
    }
    if "task_id" in route_parameters:
        ids["task_id"] = await _create_bulk(client, owner)
    # Assigned to the device, as the dispatcher would, so the row has every link set.
    async with session_factory() as session:
        await session.execute(
            update(SMSMessage)
            .where(SMSMessage.user_id == owner.id)
            .values(device_id=device["device_id"])
        )
        await session.commit()
    return Victim(owner, api_key["api_key"], ids, webhook_receiver)


@pytest.fixture
async def intruder(client: AsyncClient, make_user: MakeUser) -> Intruder:
    user = await make_user(plan="pro")
    api_key = await create_api_key(client, user, name="intruder's server")
    return Intruder(user, api_key["api_key"])


def _id_routes(app: FastAPI) -> list[tuple[str, str, bool]]:
    routes = []
    for method, path, route in api_routes(app):
        if PATH_PARAMETER.search(path) is None:
            continue
        routes.append((method, path, body_is_required(route)))
    return routes


async def test_matrix_covers_every_id_route(app: FastAPI, victim: Victim) -> None:
    for method, path, needs_body in _id_routes(app):
        for name in PATH_PARAMETER.findall(path):
            assert name in victim.ids, f"{method} {path}: no owner's {name} to attack"
        if needs_body:
            assert (method, path) in VALID_BODIES, f"{method} {path}: add a valid body"


@pytest.mark.parametrize("credential", ["token", "api_key"])
async def test_other_users_ids_are_not_found(
    app: FastAPI,
    client: AsyncClient,
    session_factory: Sessions,
    victim: Victim,
    intruder: Intruder,
    credential: str,
) -> None:
    before = await snapshot_rows_of(session_factory, victim.user.id)
    headers = intruder.credentials()[credential]

    outcomes = []
    for method, path, _ in _id_routes(app):
        url = PATH_PARAMETER.sub(lambda match: victim.ids[match.group(1)], path)
        body = VALID_BODIES.get((method, path))
        response = await client.request(method, url, json=body, headers=headers)
        outcomes.append((method, path, response.status_code, response.json()))

    for method, path, status, payload in outcomes:
        assert status == 404, f"{method} {path}: {status} {payload}"
        assert payload["success"] is False, f"{method} {path}"
        assert payload["error"].endswith("not_found"), f"{method} {path}: {payload}"
    assert await snapshot_rows_of(session_factory, victim.user.id) == before
    assert victim.receiver.requests == []


@pytest.mark.parametrize("credential", ["token", "api_key"])
async def test_other_users_ids_in_bodies_and_filters(
    app: FastAPI,
    client: AsyncClient,
    session_factory: Sessions,
    victim: Victim,
    intruder: Intruder,
    credential: str,
) -> None:
    before = await snapshot_rows_of(session_factory, victim.user.id)
    headers = intruder.credentials()[credential]
    device_id = victim.ids["device_id"]
    routes = {(method, path) for method, path, _ in api_routes(app)}

    send = await client.post(
        "/api/v1/sms/send",
        json={"to": "+525512345678", "body": "Hola", "device_id": device_id},
        headers=headers,
    )
    filtered = [
        await client.get(path, params={"device_id": device_id}, headers=headers)
        for path in ("/api/v1/sms/messages", "/api/v1/sms/incoming")
    ]
    listings = [
        await client.get(path, headers=headers)
        for path in (
            "/api/v1/sms/devices",
            "/api/v1/sms/messages",
            "/api/v1/sms/incoming",
            "/api/v1/sms/webhooks",
            "/api/v1/users/me/api-keys",
        )
    ]

    assert send.status_code == 404
    assert send.json()["error"] == "device_not_found"
    for response in filtered:
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "device_not_found"
        assert response.json()["device_id"] == device_id
    for listing in listings:
        assert listing.status_code == 200, listing.text
        for value in victim.ids.values():
            assert value not in listing.text
    if ("POST", "/api/v1/sms/send-bulk") in routes:
        bulk = await client.post(
            "/api/v1/sms/send-bulk",
            json={
                "recipients": ["+525512345678"],
                "body": "Hola",
                "device_id": device_id,
            },
            headers=headers,
        )
        assert bulk.status_code == 404, bulk.text
        assert bulk.json()["error"] == "device_not_found"
    if ("PUT", "/api/v1/sms/quota/upgrade") in routes:
        upgrade = await client.put(
            "/api/v1/sms/quota/upgrade",
            json={"user_id": str(victim.user.id), "plan": "free"},
            headers=headers,
        )
        assert upgrade.status_code == 403, upgrade.text
    assert await snapshot_rows_of(session_factory, victim.user.id) == before


async def test_owner_still_reaches_own_ids(
    app: FastAPI, client: AsyncClient, victim: Victim
) -> None:
    for credential in ({**victim.user.headers}, key_headers(victim.api_key)):
        for method, path, _ in _id_routes(app):
            if method != "GET":
                continue
            url = PATH_PARAMETER.sub(lambda match: victim.ids[match.group(1)], path)
            response = await client.get(url, headers=credential)
            assert response.status_code == 200, f"{path}: {response.text}"
