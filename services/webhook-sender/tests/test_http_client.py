import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from mensajero_common.settings import Settings
from mensajero_common.testing import (
    RebindingDNS,
    WebhookReceiver,
    answer_lifespan,
    free_port,
    issue_server_certificate,
    scaled,
    serve_app,
    serve_raw_reply,
)
from mensajero_common.webhooks import AttemptResult, UnsafeWebhookURLError, verify
from mensajero_webhooks.delivery.http_client import (
    MAX_RESPONSE_BODY_BYTES,
    USER_AGENT,
    PublicAddressResolver,
    create_http_session,
    post_event,
)

BODY = json.dumps({"body": "Hola <b> & ñ 😀"}, ensure_ascii=False).encode()


async def post(
    settings: Settings,
    url: str,
    *,
    timeout_s: float = 5,
    require_https: bool = False,
    allow_private: bool = True,
    event_ids: tuple[str, ...] = ("evt_1",),
) -> list[AttemptResult]:
    """POST BODY once per event id through one connection pool, in turn."""
    results = []
    async with create_http_session(settings) as session:
        for event_id in event_ids:
            result = await post_event(
                session,
                url=url,
                secret="secret",
                event_id=event_id,
                body=BODY,
                timeout_s=timeout_s,
                require_https=require_https,
                allow_private=allow_private,
            )
            results.append(result)
    return results


class RecordingEndpoint:
    """An endpoint that sets a cookie, responds with a body of `body_bytes`, and records
    each request's headers and client address."""

    def __init__(self, body_bytes: int = 2) -> None:
        self.body_bytes = body_bytes
        self.requests: list[dict[str, str]] = []
        self.clients: list[tuple[str, int]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        self.requests.append(
            {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        )
        self.clients.append(scope["client"])
        headers = [
            (b"set-cookie", b"session=tenant-a; Path=/"),
            (b"content-length", str(self.body_bytes).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"x" * self.body_bytes})


async def test_post_event_sends_signed_exact_bytes(settings: Settings) -> None:
    receiver = WebhookReceiver([204])
    async with serve_app(receiver) as base_url:
        [result] = await post(settings, f"{base_url}/hook")

    assert result.status_code == 204
    assert result.succeeded
    headers, body, _ = receiver.requests[0]
    assert body == BODY
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == USER_AGENT
    assert headers["x-webhook-id"] == "evt_1"
    assert headers["webhook-id"] == "evt_1"
    assert headers["webhook-timestamp"] == headers["x-webhook-timestamp"]
    assert "accept-encoding" not in headers
    assert verify(
        "secret",
        int(headers["x-webhook-timestamp"]),
        body,
        headers["x-webhook-signature"],
    )


async def test_post_event_reports_timeout(settings: Settings) -> None:
    receiver = WebhookReceiver([200], delay_s=2)
    async with serve_app(receiver) as base_url:
        [result] = await post(settings, f"{base_url}/hook", timeout_s=0.2)

    assert result.status_code is None
    assert result.error == "timeout"


async def test_post_event_timeout_covers_slow_body(settings: Settings) -> None:
    """An endpoint that sends its body a few bytes at a time cannot outlast the timeout."""

    async def dripping_endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(15):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await asyncio.sleep(0.1)
        await send({"type": "http.response.body", "body": b""})

    async with serve_app(dripping_endpoint) as base_url:
        started = time.monotonic()
        [result] = await post(settings, f"{base_url}/hook", timeout_s=0.5)
        elapsed_s = time.monotonic() - started

    assert result.error == "timeout"
    assert elapsed_s < scaled(2)


async def test_post_event_does_not_follow_redirects(settings: Settings) -> None:
    receiver = WebhookReceiver([302])
    async with serve_app(receiver) as base_url:
        [result] = await post(settings, f"{base_url}/hook")

    assert result.status_code == 302
    assert not result.succeeded
    assert len(receiver.requests) == 1


async def test_post_event_sends_no_cookies(settings: Settings) -> None:
    endpoint = RecordingEndpoint()
    async with serve_app(endpoint) as base_url:
        results = await post(settings, f"{base_url}/hook", event_ids=("e1", "e2"))

    assert [result.status_code for result in results] == [200, 200]
    assert len(endpoint.requests) == 2
    assert "cookie" not in endpoint.requests[1]


async def test_post_event_reuses_connection_after_small_body(
    settings: Settings,
) -> None:
    endpoint = RecordingEndpoint(body_bytes=MAX_RESPONSE_BODY_BYTES)
    async with serve_app(endpoint) as base_url:
        results = await post(settings, f"{base_url}/hook", event_ids=("e1", "e2"))

    assert [result.status_code for result in results] == [200, 200]
    assert endpoint.clients[0] == endpoint.clients[1]


async def test_post_event_closes_connection_after_large_body(
    settings: Settings,
) -> None:
    endpoint = RecordingEndpoint(body_bytes=4 * MAX_RESPONSE_BODY_BYTES)
    async with serve_app(endpoint) as base_url:
        results = await post(settings, f"{base_url}/hook", event_ids=("e1", "e2"))

    assert [result.status_code for result in results] == [200, 200]
    assert endpoint.clients[0] != endpoint.clients[1]


async def test_post_event_skips_connection_closed_by_endpoint(
    settings: Settings,
) -> None:
    """A pooled connection that the endpoint has closed is not used for the next POST."""
    connections = 0

    async def answer_once_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal connections
        connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        # HTTP/1.1 without "Connection: close", so the client pools the connection.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer_once_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with create_http_session(settings) as session:
            statuses = []
            for event_id in ("e1", "e2"):
                result = await post_event(
                    session,
                    url=f"http://127.0.0.1:{port}/hook",
                    secret="secret",
                    event_id=event_id,
                    body=BODY,
                    timeout_s=5,
                    require_https=False,
                    allow_private=True,
                )
                statuses.append(result.status_code)
                await asyncio.sleep(0.3)
    finally:
        server.close()
        await server.wait_closed()

    assert statuses == [200, 200]
    assert connections == 2


async def test_post_event_reports_refused_connection(settings: Settings) -> None:
    [result] = await post(settings, f"http://127.0.0.1:{free_port()}/hook")

    assert result.status_code is None
    assert result.error == "connection_error: connect_failed"


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"", "connection_error: disconnected"),
        (b"NOT HTTP AT ALL\r\n\r\n", "connection_error: protocol_error"),
    ],
)
async def test_post_event_names_broken_endpoints(
    settings: Settings, reply: bytes, error: str
) -> None:
    # The same names as the API's httpx client gives (mensajero_common.webhooks).
    async with serve_raw_reply(reply) as port:
        [result] = await post(settings, f"http://127.0.0.1:{port}/hook")

    assert result.status_code is None
    assert result.error == error


async def test_post_event_reaches_trusted_tls_endpoint(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control for the TLS failures below: the same server, once its certificate
    # authority is trusted through SSL_CERT_FILE, gets the POST.
    certificate = issue_server_certificate(tmp_path, "127.0.0.1")
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate.ca_file))
    receiver = WebhookReceiver([200])
    async with serve_app(
        receiver,
        ssl_certfile=str(certificate.cert_file),
        ssl_keyfile=str(certificate.key_file),
    ) as base_url:
        [result] = await post(settings, f"{base_url}/hook")

    assert base_url.startswith("https://")
    assert result.status_code == 200
    assert result.error is None
    assert len(receiver.requests) == 1


@pytest.mark.parametrize(
    ("certificate_hosts", "trust_authority"),
    [
        # A certificate from an authority that the client does not trust.
        (("127.0.0.1",), False),
        # A trusted authority, but the certificate names another host.
        (("other.invalid",), True),
    ],
)
async def test_post_event_reports_tls_failure(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    certificate_hosts: tuple[str, ...],
    trust_authority: bool,
) -> None:
    certificate = issue_server_certificate(tmp_path, *certificate_hosts)
    if trust_authority:
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate.ca_file))
    else:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    receiver = WebhookReceiver([200])
    async with serve_app(
        receiver,
        ssl_certfile=str(certificate.cert_file),
        ssl_keyfile=str(certificate.key_file),
    ) as base_url:
        [result] = await post(settings, f"{base_url}/hook")

    assert result.status_code is None
    assert result.error == "connection_error: tls_failed"
    assert receiver.requests == []


async def test_post_event_reports_https_to_plain_http(settings: Settings) -> None:
    receiver = WebhookReceiver([200])
    async with serve_app(receiver) as base_url:
        port = base_url.rsplit(":", 1)[1]
        [result] = await post(settings, f"https://127.0.0.1:{port}/hook")

    assert result.status_code is None
    assert result.error == "connection_error: tls_failed"
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("url", "require_https", "error"),
    [
        ("http://127.0.0.1:{port}/hook", False, "private_address"),
        ("http://localhost:{port}/hook", False, "private_address"),
        ("http://127.0.0.1:{port}/hook", True, "https_required"),
        ("http://user:pass@127.0.0.1:{port}/hook", False, "credentials_in_url"),
    ],
)
async def test_post_event_rejects_unsafe_url(
    settings: Settings, url: str, require_https: bool, error: str
) -> None:
    receiver = WebhookReceiver([200])
    async with serve_app(receiver) as base_url:
        port = base_url.rsplit(":", 1)[1]
        [result] = await post(
            settings,
            url.format(port=port),
            require_https=require_https,
            allow_private=False,
        )

    assert result.status_code is None
    assert result.error == error
    assert receiver.requests == []


# A global address for the first DNS answer. Nothing connects to it: the URL check
# consumes that answer, and the connection's lookup gets 127.0.0.1.
PUBLIC_ADDRESS = "93.184.215.14"


async def test_post_event_rejects_host_rebound_to_loopback(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked_settings = settings.model_copy(update={"WEBHOOK_ALLOW_PRIVATE_URLS": False})
    victim = WebhookReceiver([200])
    async with serve_app(victim) as base_url:
        port = base_url.rsplit(":", 1)[1]
        dns = RebindingDNS("hooks.rebind.test", [PUBLIC_ADDRESS, "127.0.0.1"])
        monkeypatch.setattr(socket, "getaddrinfo", dns)
        [result] = await post(
            checked_settings,
            f"http://hooks.rebind.test:{port}/hook",
            allow_private=False,
        )
        monkeypatch.undo()

    assert dns.lookups == 2
    assert result.status_code is None
    assert result.error == "private_address"
    assert victim.requests == []


async def test_post_event_reaches_host_name_when_private_allowed(
    settings: Settings,
) -> None:
    allowed_settings = settings.model_copy(update={"WEBHOOK_ALLOW_PRIVATE_URLS": True})
    receiver = WebhookReceiver([204])
    async with serve_app(receiver) as base_url:
        port = base_url.rsplit(":", 1)[1]
        [result] = await post(allowed_settings, f"http://localhost:{port}/hook")

    assert result.status_code == 204
    headers, body, _ = receiver.requests[0]
    assert headers["host"] == f"localhost:{port}"
    assert body == BODY


async def test_public_address_resolver_rejects_any_private_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dns = RebindingDNS("hooks.rebind.test", ["127.0.0.1"])
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    resolver = PublicAddressResolver()

    with pytest.raises(UnsafeWebhookURLError) as caught:
        await resolver.resolve("hooks.rebind.test", 443)

    assert caught.value.reason == "private_address"
    assert caught.value.url == "hooks.rebind.test"


async def test_public_address_resolver_returns_public_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dns = RebindingDNS("hooks.rebind.test", [PUBLIC_ADDRESS])
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    resolver = PublicAddressResolver()

    results = await resolver.resolve("hooks.rebind.test", 443)

    assert [result["host"] for result in results] == [PUBLIC_ADDRESS]
    assert [result["port"] for result in results] == [443]
