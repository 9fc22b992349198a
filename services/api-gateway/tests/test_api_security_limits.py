"""Request size limits, SSRF rules of the webhook test, and device key expiry."""

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from api_test_helpers import ApiUser, count_rows, register_device
from fastapi import FastAPI
from httpx import AsyncClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.main import MAX_REQUEST_BODY_BYTES, create_app
from mensajero_common.models import SMSDevice, SMSMessage
from mensajero_common.settings import Settings
from mensajero_common.testing import WebhookReceiver, serve_app

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"RATE_LIMIT_ENABLED": False})


@pytest.fixture
async def api_url(
    settings: Settings, session_factory: Sessions, redis: object
) -> AsyncIterator[str]:
    """The API behind a real uvicorn, so that bodies arrive as a client sends them."""
    async with serve_app(create_app(settings)) as url:
        yield url


async def _chunks(total_bytes: int) -> AsyncIterator[bytes]:
    chunk = b" " * 65536
    sent = 0
    while sent < total_bytes:
        yield chunk
        sent += len(chunk)


async def test_chunked_body_over_limit_is_413(
    api_url: str, user: ApiUser, session_factory: Sessions
) -> None:
    async with httpx.AsyncClient(base_url=api_url) as client:
        response = await client.post(
            "/api/v1/sms/send",
            content=_chunks(MAX_REQUEST_BODY_BYTES * 4),
            headers={**user.headers, "Content-Type": "application/json"},
        )

    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert str(MAX_REQUEST_BODY_BYTES) in response.json()["message"]
    assert await count_rows(session_factory, SMSMessage) == 0


async def test_declared_length_over_limit_is_413(api_url: str, user: ApiUser) -> None:
    async with httpx.AsyncClient(base_url=api_url) as client:
        response = await client.post(
            "/api/v1/sms/devices",
            content=b"{" + b" " * MAX_REQUEST_BODY_BYTES + b"}",
            headers={**user.headers, "Content-Type": "application/json"},
        )

    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


async def test_body_at_limit_is_read(api_url: str, user: ApiUser) -> None:
    padding = " " * (MAX_REQUEST_BODY_BYTES - 100)
    body = f'{{"name": "Pixel"{padding}}}'.encode()

    async with httpx.AsyncClient(base_url=api_url) as client:
        response = await client.post(
            "/api/v1/sms/devices",
            content=body,
            headers={**user.headers, "Content-Type": "application/json"},
        )

    assert len(body) <= MAX_REQUEST_BODY_BYTES
    assert response.status_code == 201, response.text


@pytest.fixture
async def redirect_target() -> AsyncIterator[tuple[WebhookReceiver, str]]:
    target = WebhookReceiver()
    async with serve_app(target) as url:
        yield target, url


def _redirector(location: str) -> Any:
    """An ASGI app that answers every request with 302 to `location`."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 302,
                "headers": [(b"location", location.encode())],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    return app


async def _create_webhook(client: AsyncClient, owner: ApiUser, url: str) -> str:
    response = await client.post(
        "/api/v1/sms/webhooks", json={"url": url}, headers=owner.headers
    )
    assert response.status_code == 201, response.text
    return str(response.json()["data"]["id"])


async def test_webhook_test_does_not_follow_redirect(
    client: AsyncClient,
    user: ApiUser,
    redirect_target: tuple[WebhookReceiver, str],
) -> None:
    target, target_url = redirect_target
    async with serve_app(_redirector(f"{target_url}/internal-admin")) as url:
        webhook_id = await _create_webhook(client, user, f"{url}/hook")
        response = await client.post(
            f"/api/v1/sms/webhooks/{webhook_id}/test", headers=user.headers
        )

    result = response.json()["data"]
    assert response.status_code == 200
    assert result["success"] is False
    assert result["status_code"] == 302
    assert target.requests == []


async def test_webhook_test_rechecks_private_address(
    app: FastAPI, settings: Settings, user: ApiUser
) -> None:
    receiver = WebhookReceiver()
    strict = create_app(
        settings.model_copy(update={"WEBHOOK_ALLOW_PRIVATE_URLS": False})
    )
    async with serve_app(receiver) as receiver_url:
        # Saved while private addresses were allowed (or while DNS named a public one).
        transport = httpx.ASGITransport(app=app)
        async with AsyncClient(transport=transport, base_url="http://test") as client:
            webhook_id = await _create_webhook(client, user, f"{receiver_url}/hook")
        async with strict.router.lifespan_context(strict):
            transport = httpx.ASGITransport(app=strict)
            async with AsyncClient(
                transport=transport, base_url="http://test"
            ) as client:
                response = await client.post(
                    f"/api/v1/sms/webhooks/{webhook_id}/test", headers=user.headers
                )

    result = response.json()["data"]
    assert response.status_code == 200
    assert result["success"] is False
    assert result["error"] == "private_address"
    assert receiver.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:6379/",
        "http://[::1]/",
        "http://10.0.0.1/",
        "http://user:pass@example.com/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_FLUSHALL",
    ],
)
async def test_strict_mode_rejects_unsafe_webhook_urls(
    settings: Settings, user: ApiUser, session_factory: Sessions, url: str
) -> None:
    strict = create_app(
        settings.model_copy(update={"WEBHOOK_ALLOW_PRIVATE_URLS": False})
    )
    async with strict.router.lifespan_context(strict):
        transport = httpx.ASGITransport(app=strict)
        async with AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post(
                "/api/v1/sms/webhooks", json={"url": url}, headers=user.headers
            )

    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_webhook_url"


async def _device_row(sessions: Sessions, device_id: str) -> SMSDevice:
    async with sessions() as session:
        row = await session.get(SMSDevice, uuid.UUID(device_id))
        assert row is not None
        return row


async def test_device_key_expiry_on_register_and_rotate(
    client: AsyncClient, user: ApiUser, session_factory: Sessions
) -> None:
    device = await register_device(client, user, api_key_expires_in_days=30)
    registered = await _device_row(session_factory, device["device_id"])
    rotated = await client.post(
        f"/api/v1/sms/devices/{device['device_id']}/rotate-key",
        json={"api_key_expires_in_days": 1},
        headers=user.headers,
    )
    after_rotation = await _device_row(session_factory, device["device_id"])
    without_body = await client.post(
        f"/api/v1/sms/devices/{device['device_id']}/rotate-key", headers=user.headers
    )
    after_second = await _device_row(session_factory, device["device_id"])

    now = datetime.now(UTC)
    assert registered.api_key_expires_at is not None
    assert (
        timedelta(days=29) < registered.api_key_expires_at - now <= timedelta(days=30)
    )
    assert device["api_key_expires_at"] is not None
    assert rotated.status_code == 200, rotated.text
    assert after_rotation.api_key_expires_at is not None
    assert (
        timedelta(hours=23)
        < after_rotation.api_key_expires_at - now
        <= timedelta(days=1)
    )
    assert rotated.json()["data"]["api_key"] != device["api_key"]
    assert without_body.status_code == 200
    assert after_second.api_key_expires_at is None


@pytest.mark.parametrize("days", [0, -1, 3651, "soon"])
async def test_device_key_expiry_out_of_range(
    client: AsyncClient, user: ApiUser, session_factory: Sessions, days: object
) -> None:
    response = await client.post(
        "/api/v1/sms/devices",
        json={"name": "Pixel", "api_key_expires_in_days": days},
        headers=user.headers,
    )

    assert response.status_code == 422
    assert await count_rows(session_factory, SMSDevice) == 0
