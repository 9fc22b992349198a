import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import pytest
from api_test_helpers import ApiUser, MakeUser, count_rows, walk_pages
from httpx import ASGITransport, AsyncClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.main import create_app
from mensajero_api.webhooks.schemas import EventFilter
from mensajero_api.webhooks.service import MAX_WEBHOOKS_PER_USER
from mensajero_common.models import WebhookConfig, WebhookDelivery
from mensajero_common.settings import Settings
from mensajero_common.testing import RebindingDNS, WebhookReceiver, scaled, serve_app
from mensajero_common.webhook_outbox import record_message_event
from mensajero_common.webhooks import DISABLED_GONE, EVENTS, USER_AGENT, verify
from mensajero_webhooks.delivery import repository as sender_repository

SessionFactory = async_sessionmaker[AsyncSession]
WEBHOOKS_URL = "/api/v1/sms/webhooks"


async def test_create_webhook_generates_secret_once(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()

    created = await client.post(
        "/api/v1/sms/webhooks",
        json={"url": "http://127.0.0.1:9/hook", "events": ["sms_received", "sms_sent"]},
        headers=owner.headers,
    )
    listed = await client.get("/api/v1/sms/webhooks", headers=owner.headers)

    assert created.status_code == 201, created.text
    data = created.json()["data"]
    assert data["secret_key"].startswith("whsec_")
    assert data["events"] == ["sms_received", "sms_sent"]
    assert data["secret_key"] not in listed.text
    assert "secret_key" not in listed.json()["data"]["items"][0]


async def test_create_webhook_keeps_user_secret_hidden(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()

    created = await client.post(
        "/api/v1/sms/webhooks",
        json={"url": "http://127.0.0.1:9/hook", "secret_key": "my-own-secret-1234"},
        headers=owner.headers,
    )

    assert created.status_code == 201
    assert created.json()["data"]["secret_key"] is None
    assert created.json()["data"]["events"] == ["sms_received"]


async def test_create_webhook_rejects_unknown_event(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()

    response = await client.post(
        "/api/v1/sms/webhooks",
        json={
            "url": "http://127.0.0.1:9/hook",
            "events": ["sms_received", "sms_exploded"],
        },
        headers={**owner.headers, "Accept-Language": "en"},
    )

    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "unknown_webhook_event"
    assert body["unknown_events"] == ["sms_exploded"]
    assert "sms_exploded" in body["message"]
    assert await count_rows(session_factory, WebhookConfig) == 0


async def test_create_webhook_rejects_bad_url(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()

    for url, reason in [
        ("ftp://example.com/x", "unsupported_scheme"),
        ("https://user:pw@example.com", "credentials_in_url"),
    ]:
        response = await client.post(
            "/api/v1/sms/webhooks", json={"url": url}, headers=owner.headers
        )
        assert response.status_code == 400, url
        assert response.json()["error"] == "invalid_webhook_url"
        assert response.json()["reason"] == reason


async def test_create_webhook_rejects_private_url_in_production(
    settings: Settings, make_user: MakeUser
) -> None:
    production_like = settings.model_copy(update={"WEBHOOK_ALLOW_PRIVATE_URLS": False})
    application = create_app(production_like)
    owner = await make_user()

    async with (
        application.router.lifespan_context(application),
        AsyncClient(
            transport=ASGITransport(app=application), base_url="http://testserver"
        ) as private_client,
    ):
        response = await private_client.post(
            "/api/v1/sms/webhooks",
            json={"url": "http://169.254.169.254/latest"},
            headers=owner.headers,
        )

    assert response.status_code == 400
    assert response.json()["reason"] == "private_address"


async def test_update_and_delete_webhook(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    created = await client.post(
        "/api/v1/sms/webhooks",
        json={"url": "http://127.0.0.1:9/hook"},
        headers=owner.headers,
    )
    webhook_id = created.json()["data"]["id"]

    updated = await client.put(
        f"/api/v1/sms/webhooks/{webhook_id}",
        json={"events": ["sms_delivered"], "is_active": False},
        headers=owner.headers,
    )
    deleted = await client.delete(
        f"/api/v1/sms/webhooks/{webhook_id}", headers=owner.headers
    )
    read_after = await client.get(
        f"/api/v1/sms/webhooks/{webhook_id}", headers=owner.headers
    )

    assert updated.status_code == 200
    assert updated.json()["data"]["events"] == ["sms_delivered"]
    assert updated.json()["data"]["is_active"] is False
    assert updated.json()["data"]["url"] == "http://127.0.0.1:9/hook"
    assert deleted.status_code == 200
    assert read_after.status_code == 404
    assert read_after.json()["error"] == "webhook_not_found"


async def test_enabling_webhook_clears_disabled_reason(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    created = await client.post(
        "/api/v1/sms/webhooks",
        json={"url": "http://127.0.0.1:9/hook"},
        headers=owner.headers,
    )
    webhook_id = created.json()["data"]["id"]
    webhook_url = f"/api/v1/sms/webhooks/{webhook_id}"
    # The webhook-sender's own SQL, as it runs after a 410 Gone.
    async with sender_repository.pooled_connection(
        session_factory.kw["bind"]
    ) as connection:
        await sender_repository.disable_webhook(
            connection, uuid.UUID(webhook_id), DISABLED_GONE
        )

    disabled = await client.get(webhook_url, headers=owner.headers)
    listed = await client.get("/api/v1/sms/webhooks", headers=owner.headers)
    events_changed = await client.put(
        webhook_url, json={"events": ["sms_failed"]}, headers=owner.headers
    )
    enabled = await client.put(
        webhook_url, json={"is_active": True}, headers=owner.headers
    )
    disabled_by_owner = await client.put(
        webhook_url, json={"is_active": False}, headers=owner.headers
    )

    assert created.json()["data"]["disabled_reason"] is None
    assert created.json()["data"]["disabled_at"] is None
    assert disabled.json()["data"]["is_active"] is False
    assert disabled.json()["data"]["disabled_reason"] == "gone"
    assert disabled.json()["data"]["disabled_at"] is not None
    assert listed.json()["data"]["items"][0]["disabled_reason"] == "gone"
    assert events_changed.json()["data"]["disabled_reason"] == "gone"
    assert (
        events_changed.json()["data"]["disabled_at"]
        == (disabled.json()["data"]["disabled_at"])
    )
    assert enabled.status_code == 200
    assert enabled.json()["data"]["is_active"] is True
    assert enabled.json()["data"]["disabled_reason"] is None
    assert enabled.json()["data"]["disabled_at"] is None
    assert disabled_by_owner.json()["data"]["is_active"] is False
    assert disabled_by_owner.json()["data"]["disabled_reason"] is None
    async with session_factory() as session:
        stored = await session.get_one(WebhookConfig, uuid.UUID(webhook_id))
    assert stored.disabled_reason is None
    assert stored.disabled_at is None


async def test_other_users_webhook_is_not_found(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    intruder = await make_user()
    created = await client.post(
        "/api/v1/sms/webhooks",
        json={"url": "http://127.0.0.1:9/hook"},
        headers=owner.headers,
    )
    webhook_id = created.json()["data"]["id"]

    responses = [
        await client.get(
            f"/api/v1/sms/webhooks/{webhook_id}", headers=intruder.headers
        ),
        await client.put(
            f"/api/v1/sms/webhooks/{webhook_id}",
            json={"is_active": False},
            headers=intruder.headers,
        ),
        await client.post(
            f"/api/v1/sms/webhooks/{webhook_id}/test", headers=intruder.headers
        ),
        await client.get(
            f"/api/v1/sms/webhooks/{webhook_id}/deliveries", headers=intruder.headers
        ),
        await client.delete(
            f"/api/v1/sms/webhooks/{webhook_id}", headers=intruder.headers
        ),
    ]

    assert [response.status_code for response in responses] == [404] * 5
    assert await count_rows(session_factory, WebhookConfig, is_active=True) == 1
    assert await count_rows(session_factory, WebhookDelivery) == 0


async def test_webhook_test_reports_answer_and_logs_it(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    receiver = WebhookReceiver([202])
    async with serve_app(receiver) as base_url:
        created = await client.post(
            "/api/v1/sms/webhooks",
            json={"url": f"{base_url}/hook"},
            headers=owner.headers,
        )
        webhook = created.json()["data"]
        tested = await client.post(
            f"/api/v1/sms/webhooks/{webhook['id']}/test", headers=owner.headers
        )

    log = await client.get(
        f"/api/v1/sms/webhooks/{webhook['id']}/deliveries", headers=owner.headers
    )

    assert tested.status_code == 200
    result = tested.json()["data"]
    assert result["success"] is True
    assert result["status_code"] == 202
    headers, body, _ = receiver.requests[0]
    assert verify(
        webhook["secret_key"],
        int(headers["x-webhook-timestamp"]),
        body,
        headers["x-webhook-signature"],
    )
    # The same User-Agent as the webhook-sender's events.
    assert headers["user-agent"] == USER_AGENT
    items = log.json()["data"]["items"]
    assert len(items) == 1
    assert items[0]["event"] == "webhook_test"
    assert items[0]["status"] == "succeeded"
    assert items[0]["attempts"][0]["status_code"] == 202
    assert items[0]["last_error"] is None


async def test_webhook_test_delivery_timestamps_in_order(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    receiver = WebhookReceiver([200])
    async with serve_app(receiver) as base_url:
        created = await client.post(
            WEBHOOKS_URL, json={"url": f"{base_url}/hook"}, headers=owner.headers
        )
        webhook_id = created.json()["data"]["id"]
        tested = await client.post(
            f"{WEBHOOKS_URL}/{webhook_id}/test", headers=owner.headers
        )

    log = await client.get(
        f"{WEBHOOKS_URL}/{webhook_id}/deliveries", headers=owner.headers
    )

    assert tested.status_code == 200, tested.text
    delivery = log.json()["data"]["items"][0]
    attempt = delivery["attempts"][0]
    created_at = datetime.fromisoformat(delivery["created_at"])
    started_at = datetime.fromisoformat(attempt["started_at"])
    completed_at = datetime.fromisoformat(delivery["completed_at"])
    assert created_at <= started_at
    assert started_at <= completed_at
    assert completed_at - started_at <= timedelta(
        milliseconds=attempt["duration_ms"] + 1
    )


async def _record_received_event(
    session: AsyncSession, owner: ApiUser
) -> list[uuid.UUID]:
    return await record_message_event(
        session,
        event="sms_received",
        user_id=owner.id,
        message_id=uuid.uuid4(),
        from_number="+34600000000",
        to_number=None,
        body="Hola",
        timestamp=datetime.now(UTC),
        device_id=None,
    )


async def test_deliveries_show_why_cancelled(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    created = await client.post(
        WEBHOOKS_URL, json={"url": "http://127.0.0.1:9/hook"}, headers=owner.headers
    )
    webhook_id = created.json()["data"]["id"]
    async with session_factory() as session:
        [unsubscribed] = await _record_received_event(session, owner)
        [disabled] = await _record_received_event(session, owner)
        await session.commit()
        # The webhook-sender's own SQL, as it runs for a delivery of an event that the
        # webhook no longer takes, and after a 410 Gone.
        await sender_repository.cancel(session, unsubscribed, "unsubscribed")
        await session.commit()
    async with sender_repository.pooled_connection(
        session_factory.kw["bind"]
    ) as connection:
        await sender_repository.disable_webhook(
            connection, uuid.UUID(webhook_id), DISABLED_GONE
        )

    log = await client.get(
        f"{WEBHOOKS_URL}/{webhook_id}/deliveries", headers=owner.headers
    )

    assert log.status_code == 200, log.text
    items = {item["id"]: item for item in log.json()["data"]["items"]}
    assert set(items) == {str(unsubscribed), str(disabled)}
    assert items[str(unsubscribed)]["status"] == "cancelled"
    assert items[str(unsubscribed)]["last_error"] == "unsubscribed"
    assert items[str(disabled)]["status"] == "cancelled"
    assert items[str(disabled)]["last_error"] == "webhook_disabled"


@contextlib.asynccontextmanager
async def raw_endpoint(
    answer: Callable[[asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """Serve `answer` to every connection on a loopback port; yield the URL to post to."""

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            await answer(writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/hook"


async def _test_call(client: AsyncClient, owner: ApiUser, url: str) -> dict[str, Any]:
    created = await client.post(
        "/api/v1/sms/webhooks", json={"url": url}, headers=owner.headers
    )
    tested = await client.post(
        f"/api/v1/sms/webhooks/{created.json()['data']['id']}/test",
        headers=owner.headers,
    )
    assert tested.status_code == 200
    data: dict[str, Any] = tested.json()["data"]
    return data


async def test_webhook_test_timeout_bounds_whole_attempt(
    settings: Settings, make_user: MakeUser, redis: object
) -> None:
    """An endpoint that sends its response a byte at a time gets no more than the
    timeout, although each byte arrives well within it."""
    owner = await make_user()
    short = settings.model_copy(update={"WEBHOOK_TIMEOUT_S": 1.0})
    app = create_app(short)

    async def drip(writer: asyncio.StreamWriter) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)

    async with (
        app.router.lifespan_context(app),
        AsyncClient(transport=ASGITransport(app=app), base_url="http://test") as client,
        raw_endpoint(drip) as url,
    ):
        started = time.monotonic()
        result = await _test_call(client, owner, url)
        elapsed_s = time.monotonic() - started

    assert result["success"] is False
    assert result["error"] == "timeout"
    # The response takes about 8 s; the attempt ends after the timeout of 1 s.
    assert elapsed_s < scaled(4)


async def test_webhook_test_leaves_huge_body_unread(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    sent: list[int] = []

    async def huge(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
        chunk = b"x" * 65_536
        with contextlib.suppress(ConnectionError):
            for _ in range(15_000):
                writer.write(chunk)
                await writer.drain()
                sent.append(len(chunk))

    async with raw_endpoint(huge) as url:
        result = await _test_call(client, owner, url)

    assert result["success"] is True
    assert result["status_code"] == 200
    # The API closed the connection long before the 1 GB body was sent.
    assert sum(sent) < 100_000_000


async def test_webhook_test_holds_no_database_connection(
    settings: Settings, client: AsyncClient, make_user: MakeUser
) -> None:
    """While test events wait for a slow endpoint, other requests still get a Postgres
    connection, even with more tests in flight than the API's pool holds."""
    owner = await make_user()
    answered = asyncio.Event()

    async def slow(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(scaled(1.5))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        answered.set()

    async with raw_endpoint(slow) as url:
        tests = [
            asyncio.create_task(_test_call(client, owner, url))
            for _ in range(
                settings.DATABASE_POOL_SIZE + settings.DATABASE_MAX_OVERFLOW + 1
            )
        ]
        await asyncio.sleep(scaled(0.5))
        quota = await client.get("/api/v1/sms/quota", headers=owner.headers)
        quota_before_answer = not answered.is_set()
        results = await asyncio.gather(*tests)

    assert quota.status_code == 200
    assert quota_before_answer
    assert [result["status_code"] for result in results] == [204] * len(results)


async def test_webhook_test_reports_connection_error(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    created = await client.post(
        "/api/v1/sms/webhooks",
        json={"url": "http://127.0.0.1:9/hook"},
        headers=owner.headers,
    )

    tested = await client.post(
        f"/api/v1/sms/webhooks/{created.json()['data']['id']}/test",
        headers=owner.headers,
    )

    assert tested.status_code == 200
    assert tested.json()["data"]["success"] is False
    assert tested.json()["data"]["status_code"] is None
    assert tested.json()["data"]["error"].startswith("connection_error")


async def test_webhook_test_rejects_host_rebound_to_loopback(
    settings: Settings, make_user: MakeUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    production_like = settings.model_copy(update={"WEBHOOK_ALLOW_PRIVATE_URLS": False})
    application = create_app(production_like)
    owner = await make_user()
    victim = WebhookReceiver([200])
    async with (
        serve_app(victim) as base_url,
        application.router.lifespan_context(application),
        AsyncClient(
            transport=ASGITransport(app=application), base_url="http://testserver"
        ) as private_client,
    ):
        port = base_url.rsplit(":", 1)[1]
        # Saving the webhook and the test's URL check get a public answer. Nothing
        # connects to it, because the test's connection gets 127.0.0.1.
        dns = RebindingDNS(
            "hooks.rebind.test", ["93.184.215.14", "93.184.215.14", "127.0.0.1"]
        )
        monkeypatch.setattr(socket, "getaddrinfo", dns)
        created = await private_client.post(
            "/api/v1/sms/webhooks",
            json={"url": f"http://hooks.rebind.test:{port}/hook"},
            headers=owner.headers,
        )
        tested = await private_client.post(
            f"/api/v1/sms/webhooks/{created.json()['data']['id']}/test",
            headers=owner.headers,
        )
        monkeypatch.undo()

    assert created.status_code == 201
    assert dns.lookups == 3
    assert tested.status_code == 200
    assert tested.json()["data"]["success"] is False
    assert tested.json()["data"]["status_code"] is None
    assert tested.json()["data"]["error"] == "private_address"
    assert victim.requests == []


async def test_deliveries_walk_by_cursor(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    receiver = WebhookReceiver([200] * 5)
    async with serve_app(receiver) as base_url:
        created = await client.post(
            "/api/v1/sms/webhooks",
            json={"url": f"{base_url}/hook"},
            headers=owner.headers,
        )
        webhook_id = created.json()["data"]["id"]
        for _ in range(5):
            await client.post(
                f"/api/v1/sms/webhooks/{webhook_id}/test", headers=owner.headers
            )

    pages: list[list[dict[str, Any]]] = []
    limits: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        response = await client.get(
            f"/api/v1/sms/webhooks/{webhook_id}/deliveries",
            params=params,
            headers=owner.headers,
        )
        assert response.status_code == 200, response.text
        pages.append(response.json()["data"]["items"])
        limits.append(response.json()["data"]["limit"])
        cursor = response.json()["data"]["next_cursor"]
        if cursor is None:
            break

    items = [item for page in pages for item in page]
    assert [len(page) for page in pages][:3] == [2, 2, 1]
    assert limits == [2] * len(pages)
    assert len({item["id"] for item in items}) == 5
    created_at = [item["created_at"] for item in items]
    assert created_at == sorted(created_at, reverse=True)


async def test_deliveries_rejects_bad_cursor(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    created = await client.post(
        "/api/v1/sms/webhooks",
        json={"url": "http://127.0.0.1:9/hook"},
        headers=owner.headers,
    )

    response = await client.get(
        f"/api/v1/sms/webhooks/{created.json()['data']['id']}/deliveries",
        params={"cursor": "not-a-cursor"},
        headers=owner.headers,
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_cursor"


async def test_webhook_unknown_id_is_not_found(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()

    response = await client.get(
        f"/api/v1/sms/webhooks/{uuid.uuid4()}", headers=owner.headers
    )

    assert response.status_code == 404


async def test_create_webhook_rejects_bad_secret(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()

    for secret, reason in [
        ("short", "length"),
        ("x" * 300, "length"),
        ("whsec_!!!not base64!!!xxxxxxxx", "whsec_not_base64"),
    ]:
        response = await client.post(
            "/api/v1/sms/webhooks",
            json={"url": "http://127.0.0.1:9/hook", "secret_key": secret},
            headers={**owner.headers, "Accept-Language": "en"},
        )
        assert response.status_code == 400, secret
        assert response.json()["error"] == "invalid_webhook_secret"
        assert response.json()["reason"] == reason
    assert await count_rows(session_factory, WebhookConfig) == 0


# Secrets whose text a receiver could easily copy wrong, and the reason of their 400.
UNUSABLE_SECRETS = [
    (" " * 20, "blank"),
    ("\u200b" * 20, "blank"),
    ("", "blank"),
    ("tab\tsecret-longer-than-16", "control_character"),
    ("line\nbreak-secret-longer-than-16", "control_character"),
    ("delete\x7fsecret-longer-than-16", "control_character"),
    ("c1-control\x85secret-longer-than-16", "control_character"),
    (" leading-space-secret-1234", "surrounding_whitespace"),
    ("trailing-space-secret-1234 ", "surrounding_whitespace"),
    ("no-break-space-secret-1234\u00a0", "surrounding_whitespace"),
]


async def test_create_webhook_rejects_unusable_secret(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()

    for secret, reason in UNUSABLE_SECRETS:
        response = await client.post(
            WEBHOOKS_URL,
            json={"url": "http://127.0.0.1:9/hook", "secret_key": secret},
            headers={**owner.headers, "Accept-Language": "en"},
        )
        assert response.status_code == 400, repr(secret)
        assert response.json()["error"] == "invalid_webhook_secret", repr(secret)
        assert response.json()["reason"] == reason, repr(secret)
    assert await count_rows(session_factory, WebhookConfig) == 0


async def test_update_webhook_rejects_unusable_secret(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    created = await client.post(
        WEBHOOKS_URL,
        json={"url": "http://127.0.0.1:9/hook", "secret_key": "original-secret-1234"},
        headers=owner.headers,
    )
    webhook_id = created.json()["data"]["id"]

    for secret, reason in UNUSABLE_SECRETS:
        response = await client.put(
            f"{WEBHOOKS_URL}/{webhook_id}",
            json={"secret_key": secret},
            headers={**owner.headers, "Accept-Language": "en"},
        )
        assert response.status_code == 400, repr(secret)
        assert response.json()["error"] == "invalid_webhook_secret", repr(secret)
        assert response.json()["reason"] == reason, repr(secret)
    async with session_factory() as session:
        webhook = await session.get(WebhookConfig, uuid.UUID(webhook_id))
    assert webhook is not None
    assert webhook.secret_key == "original-secret-1234"


async def test_webhook_secret_with_inner_spaces_accepted(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()

    created = await client.post(
        WEBHOOKS_URL,
        json={"url": "http://127.0.0.1:9/hook", "secret_key": "a secret with spaces"},
        headers=owner.headers,
    )
    updated = await client.put(
        f"{WEBHOOKS_URL}/{created.json()['data']['id']}",
        json={"secret_key": "another secret, señor"},
        headers=owner.headers,
    )

    assert created.status_code == 201, created.text
    assert updated.status_code == 200, updated.text


async def test_webhook_limit_rejects_one_more(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    for index in range(MAX_WEBHOOKS_PER_USER):
        created = await client.post(
            "/api/v1/sms/webhooks",
            json={"url": f"http://127.0.0.1:9/w{index}"},
            headers=owner.headers,
        )
        assert created.status_code == 201, created.text

    rejected = await client.post(
        "/api/v1/sms/webhooks",
        json={"url": "http://127.0.0.1:9/one-more"},
        headers={**owner.headers, "Accept-Language": "en"},
    )

    assert rejected.status_code == 409
    assert rejected.json()["error"] == "webhook_limit_reached"
    assert rejected.json()["limit"] == MAX_WEBHOOKS_PER_USER
    assert str(MAX_WEBHOOKS_PER_USER) in rejected.json()["message"]
    assert rejected.headers["content-language"] == "en"
    count = await count_rows(session_factory, WebhookConfig, user_id=owner.id)
    assert count == MAX_WEBHOOKS_PER_USER


async def test_parallel_creates_stop_at_webhook_limit(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    async with session_factory() as session:
        session.add_all(
            WebhookConfig(
                user_id=owner.id,
                url=f"http://127.0.0.1:9/old{index}",
                secret_key="whsec_dGVzdC1zZWNyZXQtMTIzNA==",
                events=["sms_received"],
            )
            for index in range(MAX_WEBHOOKS_PER_USER - 3)
        )
        await session.commit()

    responses = await asyncio.gather(
        *(
            client.post(
                "/api/v1/sms/webhooks",
                json={"url": f"http://127.0.0.1:9/w{index}"},
                headers=owner.headers,
            )
            for index in range(10)
        )
    )

    codes = sorted(response.status_code for response in responses)
    assert codes == [201] * 3 + [409] * 7
    rejected = [response for response in responses if response.status_code == 409]
    assert {response.json()["error"] for response in rejected} == {
        "webhook_limit_reached"
    }
    count = await count_rows(session_factory, WebhookConfig, user_id=owner.id)
    assert count == MAX_WEBHOOKS_PER_USER


async def test_create_webhook_rejects_invalid_host(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()

    for url in [
        "https://exa mple.com/",
        "not a url",
        "https://exa\tmple.com/",
        "https://exa\x00mple.com/",
        "https://example..com/",
        "https://127.1/",
    ]:
        spanish = await client.post(
            "/api/v1/sms/webhooks", json={"url": url}, headers=owner.headers
        )
        english = await client.post(
            "/api/v1/sms/webhooks",
            json={"url": url},
            headers={**owner.headers, "Accept-Language": "en"},
        )
        assert spanish.status_code == 400, url
        assert spanish.json()["error"] == "invalid_webhook_url", url
        assert spanish.json()["reason"] == "invalid_url", url
        assert spanish.json()["url"] == url
        assert "no es una URL válida" in spanish.json()["message"], url
        assert english.status_code == 400, url
        assert english.json()["reason"] == "invalid_url", url
        assert "it is not a valid URL" in english.json()["message"], url
    assert await count_rows(session_factory, WebhookConfig) == 0


async def test_create_webhook_accepts_idna_host(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()

    for url in ["http://bücher.example/hook", "http://webhook_receiver:8080/hook"]:
        response = await client.post(
            "/api/v1/sms/webhooks", json={"url": url}, headers=owner.headers
        )
        assert response.status_code == 201, response.text
        assert response.json()["data"]["url"] == url


async def test_update_webhook_rejects_invalid_host(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user()
    created = await client.post(
        "/api/v1/sms/webhooks",
        json={"url": "http://127.0.0.1:9/hook"},
        headers=owner.headers,
    )
    webhook_id = created.json()["data"]["id"]

    response = await client.put(
        f"/api/v1/sms/webhooks/{webhook_id}",
        json={"url": "https://exa mple.com/"},
        headers=owner.headers,
    )
    read_after = await client.get(
        f"/api/v1/sms/webhooks/{webhook_id}", headers=owner.headers
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_webhook_url"
    assert response.json()["reason"] == "invalid_url"
    assert read_after.json()["data"]["url"] == "http://127.0.0.1:9/hook"


async def _insert_webhooks(
    session_factory: SessionFactory, owner: ApiUser, rows: list[dict[str, Any]]
) -> list[WebhookConfig]:
    """Insert one webhook of `owner` per dict of column values, skipping the API."""
    webhooks = [
        WebhookConfig(
            user_id=owner.id,
            url=f"http://127.0.0.1:9/hook/{index}",
            secret_key="whsec_c2VlZGVkIHNlY3JldCBrZXk=",
            **{"events": ["sms_received"], **values},
        )
        for index, values in enumerate(rows)
    ]
    async with session_factory() as session:
        session.add_all(webhooks)
        await session.commit()
    return webhooks


def _in_key_order(webhooks: list[WebhookConfig], *, descending: bool) -> list[str]:
    ordered = sorted(webhooks, key=lambda w: (w.created_at, w.id), reverse=descending)
    return [str(webhook.id) for webhook in ordered]


async def test_webhook_listing_pages_both_orders(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    stranger = await make_user()
    base = datetime.now(UTC) - timedelta(hours=1)
    # Three webhooks share one created_at, so the id must order them within a walk.
    offsets = [0, 1, 1, 1, 2, 3, 4]
    owned = await _insert_webhooks(
        session_factory,
        owner,
        [{"created_at": base + timedelta(seconds=offset)} for offset in offsets],
    )
    foreign = await _insert_webhooks(
        session_factory, stranger, [{"created_at": base} for _ in range(3)]
    )

    for order in ("desc", "asc"):
        pages, limits = await walk_pages(
            client, owner, WEBHOOKS_URL, {"limit": 3, "order": order}
        )

        listed = [webhook_id for page in pages for webhook_id in page]
        assert [len(page) for page in pages] == [3, 3, 1], order
        assert listed == _in_key_order(owned, descending=order == "desc")
        assert limits == [3, 3, 3]
        assert not {str(webhook.id) for webhook in foreign} & set(listed)

    default = await client.get(WEBHOOKS_URL, headers=owner.headers)
    assert default.json()["data"]["limit"] == 50
    assert default.json()["data"]["next_cursor"] is None
    assert [item["id"] for item in default.json()["data"]["items"]] == _in_key_order(
        owned, descending=True
    )


async def test_webhook_listing_filters(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    stranger = await make_user()
    received, sent_and_failed, inactive_sent = await _insert_webhooks(
        session_factory,
        owner,
        [
            {"events": ["sms_received"]},
            {"events": ["sms_sent", "sms_failed"]},
            {"events": ["sms_sent"], "is_active": False},
        ],
    )
    await _insert_webhooks(
        session_factory, stranger, [{"events": ["sms_sent"]}, {"is_active": False}]
    )

    async def listed(params: Any) -> set[str]:
        response = await client.get(WEBHOOKS_URL, params=params, headers=owner.headers)
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()["data"]["items"]}

    assert await listed({"event": "sms_sent"}) == {
        str(sent_and_failed.id),
        str(inactive_sent.id),
    }
    assert await listed({"event": "sms_failed"}) == {str(sent_and_failed.id)}
    assert await listed({"event": "sms_delivered"}) == set()
    assert await listed({"is_active": "false"}) == {str(inactive_sent.id)}
    assert await listed({"is_active": "true", "event": "sms_sent"}) == {
        str(sent_and_failed.id)
    }
    assert await listed({"is_active": "true"}) == {
        str(received.id),
        str(sent_and_failed.id),
    }


async def test_webhook_listing_rejects_repeated_filters(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    await _insert_webhooks(
        session_factory, owner, [{"events": ["sms_sent", "sms_failed"]}]
    )
    webhook = await client.post(
        WEBHOOKS_URL, json={"url": "http://127.0.0.1:9/hook"}, headers=owner.headers
    )
    deliveries_url = f"{WEBHOOKS_URL}/{webhook.json()['data']['id']}/deliveries"
    cases = [
        (WEBHOOKS_URL, "event", ("sms_sent", "sms_failed")),
        (WEBHOOKS_URL, "event", ("sms_failed", "sms_sent")),
        (WEBHOOKS_URL, "is_active", ("true", "false")),
        (WEBHOOKS_URL, "order", ("asc", "desc")),
        (WEBHOOKS_URL, "limit", ("10", "10")),
        (WEBHOOKS_URL, "cursor", ("first", "second")),
        (deliveries_url, "limit", ("1", "2")),
        (deliveries_url, "cursor", ("first", "second")),
    ]

    for url, name, values in cases:
        response = await client.get(
            url,
            params=[(name, value) for value in values],
            headers={**owner.headers, "Accept-Language": "en"},
        )
        assert response.status_code == 422, (url, name, values)
        body = response.json()
        assert body["error"] == "validation_error"
        assert [
            (item["field"], item["location"], item["type"]) for item in body["details"]
        ] == [(name, "query", "query_parameter_repeated")], (url, name)
        assert body["details"][0]["message"].startswith(
            "This query parameter takes a single value"
        )


def test_webhook_event_filter_matches_events() -> None:
    assert get_args(EventFilter) == EVENTS


async def test_webhook_listing_rejects_bad_parameters(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    await _insert_webhooks(session_factory, owner, [{} for _ in range(3)])
    first = await client.get(WEBHOOKS_URL, params={"limit": 1}, headers=owner.headers)
    desc_cursor = first.json()["data"]["next_cursor"]
    assert desc_cursor is not None

    for params in (
        {"cursor": "garbage!"},
        {"cursor": "eyJ0IjoxfQ"},
        {"cursor": desc_cursor, "order": "asc"},
    ):
        response = await client.get(WEBHOOKS_URL, params=params, headers=owner.headers)
        assert response.status_code == 400, params
        assert response.json()["error"] == "invalid_cursor"

    for params, field, error_type in (
        ({"limit": 0}, "limit", "greater_than_equal"),
        ({"limit": 101}, "limit", "less_than_equal"),
        ({"order": "newest"}, "order", "literal_error"),
        ({"event": "sms_lost"}, "event", "literal_error"),
        ({"event": "webhook_test"}, "event", "literal_error"),
        ({"is_active": "maybe"}, "is_active", "bool_parsing"),
        ({"events": "sms_sent"}, "events", "extra_forbidden"),
    ):
        response = await client.get(
            WEBHOOKS_URL,
            params=params,
            headers={**owner.headers, "Accept-Language": "es"},
        )
        assert response.status_code == 422, params
        body = response.json()
        assert body["error"] == "validation_error"
        assert [(item["field"], item["type"]) for item in body["details"]] == [
            (field, error_type)
        ]

    largest = await client.get(
        WEBHOOKS_URL, params={"limit": 100}, headers=owner.headers
    )
    assert largest.status_code == 200
    assert largest.json()["data"]["limit"] == 100


async def test_webhook_listing_with_foreign_cursor(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    stranger = await make_user()
    base = datetime.now(UTC) - timedelta(hours=1)
    owned = await _insert_webhooks(
        session_factory,
        owner,
        [{"created_at": base + timedelta(seconds=n)} for n in (0, 2, 4)],
    )
    await _insert_webhooks(
        session_factory,
        stranger,
        [{"created_at": base + timedelta(seconds=n)} for n in (1, 3, 5)],
    )
    stranger_page = await client.get(
        WEBHOOKS_URL, params={"limit": 1, "order": "asc"}, headers=stranger.headers
    )
    foreign_cursor = stranger_page.json()["data"]["next_cursor"]

    response = await client.get(
        WEBHOOKS_URL,
        params={"cursor": foreign_cursor, "order": "asc"},
        headers=owner.headers,
    )

    # The stranger's cursor points at second 1, so it positions the walk after the
    # owner's webhook of second 0, and shows none of the stranger's.
    assert response.status_code == 200, response.text
    assert [item["id"] for item in response.json()["data"]["items"]] == (
        _in_key_order(owned, descending=False)[1:]
    )
