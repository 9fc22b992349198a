import base64
import hashlib
import hmac
import json
import socket
from pathlib import Path

import httpcore
import httpx
import pytest

from mensajero_common.testing import (
    RebindingDNS,
    WebhookReceiver,
    free_port,
    issue_server_certificate,
    serve_app,
    serve_raw_reply,
)
from mensajero_common.webhook_transport import (
    CheckedNetworkBackend,
    create_webhook_client,
)
from mensajero_common.webhooks import (
    AttemptResult,
    UnsafeWebhookURLError,
    check_addresses,
    check_url_syntax,
    check_url_target,
    generate_secret,
    post_event,
    sign,
    sign_standard,
    verify,
)

BODY = json.dumps({"body": "Hola <b> & ñ 😀"}, ensure_ascii=False).encode()


def test_sign_matches_hmac_of_timestamp_and_body() -> None:
    expected = hmac.new(b"secret", b"1700000000." + BODY, hashlib.sha256).hexdigest()

    assert sign("secret", 1700000000, BODY) == f"sha256={expected}"


def test_verify_fails_on_any_changed_byte() -> None:
    signature = sign("secret", 1700000000, BODY)

    assert verify("secret", 1700000000, BODY, signature)
    for index in range(len(BODY)):
        changed = bytearray(BODY)
        changed[index] ^= 0x01
        assert not verify("secret", 1700000000, bytes(changed), signature), index
    assert not verify("secret", 1700000001, BODY, signature)
    assert not verify("other", 1700000000, BODY, signature)


def test_sign_standard_uses_decoded_whsec_key() -> None:
    secret = generate_secret()
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, b"evt.1700000000." + BODY, hashlib.sha256).digest()

    assert (
        sign_standard(secret, "evt", 1700000000, BODY)
        == "v1," + base64.b64encode(digest).decode()
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/hook", "unsupported_scheme"),
        ("http://example.com/hook", "https_required"),
        ("https://user:pass@example.com/hook", "credentials_in_url"),
        ("https:///hook", "missing_host"),
        ("https://127.0.0.1/hook", "private_address"),
        ("https://10.1.2.3/hook", "private_address"),
        ("https://192.168.0.10/hook", "private_address"),
        ("https://169.254.169.254/latest/meta-data", "private_address"),
        ("https://[::1]/hook", "private_address"),
        ("https://[::ffff:10.0.0.1]/hook", "private_address"),
        # IPv6 forms that carry a private IPv4 address for a translator or a tunnel.
        ("https://[64:ff9b::a00:1]/hook", "private_address"),
        ("https://[64:ff9b::7f00:1]/hook", "private_address"),
        ("https://[64:ff9b:1::808:808]/hook", "private_address"),
        ("https://[2002:c0a8:101::]/hook", "private_address"),
        ("https://[2002:7f00:1::]/hook", "private_address"),
        ("https://[::c0a8:101]/hook", "private_address"),
        ("https://[::127.0.0.1]/hook", "private_address"),
        ("https://[::ffff:0:7f00:1]/hook", "private_address"),
        ("https://[::ffff:0:a9fe:a9fe]/hook", "private_address"),
        ("https://[fd00:ec2::254]/hook", "private_address"),
        ("https://100.64.0.1/hook", "private_address"),
        ("https://localhost/hook", "private_address"),
        ("https://example.com:99999/hook", "invalid_url"),
    ],
)
async def test_check_url_target_rejects(url: str, reason: str) -> None:
    with pytest.raises(UnsafeWebhookURLError) as caught:
        await check_url_target(url, require_https=True, allow_private=False)

    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808", "2002:808:808::1"],
)
def test_check_addresses_accepts_public(address: str) -> None:
    check_addresses("https://example.com/hook", [address])


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("not a url", "invalid_url"),
        ("example.com/hook", "invalid_url"),
        ("//example.com/hook", "invalid_url"),
        ("", "invalid_url"),
        ("https://exa mple.com/", "invalid_url"),
        ("https://exa mple.com:8443/", "invalid_url"),
        ("https://exa\tmple.com/", "invalid_url"),
        ("https://example.com/\nhook", "invalid_url"),
        ("https://exa\x00mple.com/", "invalid_url"),
        ("https://exa%20mple.com/", "invalid_url"),
        ("https://exa<mple.com/", "invalid_url"),
        ("https://example..com/", "invalid_url"),
        ("https://.example.com/", "invalid_url"),
        ("https://-example.com/", "invalid_url"),
        ("https://example-.com/", "invalid_url"),
        ("https://" + "a" * 64 + ".com/", "invalid_url"),
        ("https://" + "a." * 127 + "com/", "invalid_url"),
        ("https://xn--zz.com/", "invalid_url"),
        ("https://☃.net/", "invalid_url"),
        ("https://127.1/", "invalid_url"),
        ("https://1.2.3.256/", "invalid_url"),
        ("https://0x7f.0x1/", "invalid_url"),
        ("https://example.123/", "invalid_url"),
        ("https://[v1.abc]/", "invalid_url"),
        ("https://[1.2.3.4]/", "invalid_url"),
        ("https://[::1/", "invalid_url"),
        ("https://example.com:0/", "invalid_url"),
        ("https://example.com:99999/", "invalid_url"),
        ("https://example.com:port/", "invalid_url"),
        ("ftp://example.com/hook", "unsupported_scheme"),
        ("javascript:alert(1)", "unsupported_scheme"),
        ("http://example.com/hook", "https_required"),
        ("https:///hook", "missing_host"),
        ("https://user:pass@example.com/", "credentials_in_url"),
    ],
)
def test_check_url_syntax_rejects(url: str, reason: str) -> None:
    with pytest.raises(UnsafeWebhookURLError) as caught:
        check_url_syntax(url, require_https=True)

    assert caught.value.reason == reason
    assert caught.value.url == url


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("https://example.com/hook", "example.com", 443),
        ("https://EXAMPLE.com:8443/a b?q=1#f", "example.com", 8443),
        ("https://example.com./hook", "example.com.", 443),
        (
            "https://hooks.sub-domain.example.co.uk/",
            "hooks.sub-domain.example.co.uk",
            443,
        ),
        ("https://webhook_receiver:8080/", "webhook_receiver", 8080),
        ("https://localhost/", "localhost", 443),
        ("https://" + "a" * 63 + ".com/", "a" * 63 + ".com", 443),
        ("https://bücher.de/hook", "bücher.de", 443),
        ("https://xn--bcher-kva.de/hook", "xn--bcher-kva.de", 443),
        ("https://例え.テスト/", "例え.テスト", 443),
        ("https://203.0.113.7:9000/", "203.0.113.7", 9000),
        ("https://[2001:db8::1]/", "2001:db8::1", 443),
        ("https://[::ffff:10.0.0.1]:8443/", "::ffff:10.0.0.1", 8443),
        ("https://1password.com/", "1password.com", 443),
    ],
)
def test_check_url_syntax_accepts(url: str, host: str, port: int) -> None:
    assert check_url_syntax(url, require_https=True) == (host, port)


def test_check_url_syntax_defaults_http_port() -> None:
    assert check_url_syntax("http://example.com/", require_https=False) == (
        "example.com",
        80,
    )


async def test_check_url_target_allows_loopback_when_allowed() -> None:
    await check_url_target(
        "http://127.0.0.1:9/hook", require_https=False, allow_private=True
    )


async def _post(
    client: httpx.AsyncClient,
    url: str,
    *,
    timeout_s: float = 5,
    allow_private: bool = True,
) -> AttemptResult:
    """POST the test event to `url` over plain HTTP, as the API's test endpoint does."""
    return await post_event(
        client,
        url=url,
        secret="secret",
        event_id="evt_1",
        body=BODY,
        timeout_s=timeout_s,
        require_https=False,
        allow_private=allow_private,
    )


async def test_post_event_sends_signed_exact_bytes() -> None:
    receiver = WebhookReceiver([204])
    async with (
        serve_app(receiver) as base_url,
        create_webhook_client(allow_private=True) as client,
    ):
        result = await _post(client, f"{base_url}/hook")

    assert result.status_code == 204
    assert result.succeeded
    headers, body, _ = receiver.requests[0]
    assert body == BODY
    assert headers["x-webhook-id"] == "evt_1"
    assert headers["webhook-id"] == "evt_1"
    assert verify(
        "secret",
        int(headers["x-webhook-timestamp"]),
        body,
        headers["x-webhook-signature"],
    )


async def test_post_event_reports_timeout() -> None:
    receiver = WebhookReceiver([200], delay_s=2)
    async with (
        serve_app(receiver) as base_url,
        create_webhook_client(allow_private=True) as client,
    ):
        result = await _post(client, f"{base_url}/hook", timeout_s=0.2)

    assert result.status_code is None
    assert result.error == "timeout"


async def test_post_event_does_not_follow_redirects() -> None:
    receiver = WebhookReceiver([302])
    async with (
        serve_app(receiver) as base_url,
        create_webhook_client(allow_private=True) as client,
    ):
        result = await _post(client, f"{base_url}/hook")

    assert result.status_code == 302
    assert not result.succeeded
    assert len(receiver.requests) == 1


# A global address for the first DNS answer. Nothing connects to it: the URL check
# consumes that answer, and the connection's lookup gets 127.0.0.1.
PUBLIC_ADDRESS = "93.184.215.14"


async def test_post_event_rejects_host_rebound_to_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    victim = WebhookReceiver([200])
    async with serve_app(victim) as base_url:
        port = base_url.rsplit(":", 1)[1]
        dns = RebindingDNS("hooks.rebind.test", [PUBLIC_ADDRESS, "127.0.0.1"])
        monkeypatch.setattr(socket, "getaddrinfo", dns)
        async with create_webhook_client(allow_private=False) as client:
            result = await _post(
                client, f"http://hooks.rebind.test:{port}/hook", allow_private=False
            )
        monkeypatch.undo()

    assert dns.lookups == 2
    assert result.status_code is None
    assert result.error == "private_address"
    assert victim.requests == []


async def test_post_event_reaches_host_name_when_private_allowed() -> None:
    receiver = WebhookReceiver([204])
    async with (
        serve_app(receiver) as base_url,
        create_webhook_client(allow_private=True) as client,
    ):
        port = base_url.rsplit(":", 1)[1]
        result = await _post(client, f"http://localhost:{port}/hook")

    assert result.status_code == 204
    headers, body, _ = receiver.requests[0]
    assert headers["host"] == f"localhost:{port}"
    assert body == BODY


async def test_post_event_reports_refused_connection() -> None:
    async with create_webhook_client(allow_private=True) as client:
        result = await _post(client, f"http://127.0.0.1:{free_port()}/hook")

    assert result.status_code is None
    assert result.error == "connection_error: connect_failed"


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"", "connection_error: disconnected"),
        (b"NOT HTTP AT ALL\r\n\r\n", "connection_error: protocol_error"),
    ],
)
async def test_post_event_names_broken_endpoints(reply: bytes, error: str) -> None:
    async with (
        serve_raw_reply(reply) as port,
        create_webhook_client(allow_private=True) as client,
    ):
        result = await _post(client, f"http://127.0.0.1:{port}/hook")

    assert result.status_code is None
    assert result.error == error


async def test_post_event_reaches_trusted_tls_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control for the TLS failures below: the same server, once its certificate
    # authority is trusted through SSL_CERT_FILE, gets the POST.
    certificate = issue_server_certificate(tmp_path, "127.0.0.1")
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate.ca_file))
    receiver = WebhookReceiver([200])
    async with (
        serve_app(
            receiver,
            ssl_certfile=str(certificate.cert_file),
            ssl_keyfile=str(certificate.key_file),
        ) as base_url,
        create_webhook_client(allow_private=True) as client,
    ):
        result = await _post(client, f"{base_url}/hook")

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
    async with (
        serve_app(
            receiver,
            ssl_certfile=str(certificate.cert_file),
            ssl_keyfile=str(certificate.key_file),
        ) as base_url,
        create_webhook_client(allow_private=True) as client,
    ):
        result = await _post(client, f"{base_url}/hook")

    assert result.status_code is None
    assert result.error == "connection_error: tls_failed"
    assert receiver.requests == []


async def test_post_event_reports_https_to_plain_http() -> None:
    receiver = WebhookReceiver([200])
    async with (
        serve_app(receiver) as base_url,
        create_webhook_client(allow_private=True) as client,
    ):
        port = base_url.rsplit(":", 1)[1]
        result = await _post(client, f"https://127.0.0.1:{port}/hook")

    assert result.status_code is None
    assert result.error == "connection_error: tls_failed"
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("answer", "reason"),
    [("127.0.0.1", "private_address"), ("10.0.0.7", "private_address")],
)
async def test_checked_backend_rejects_private_answer(
    monkeypatch: pytest.MonkeyPatch, answer: str, reason: str
) -> None:
    dns = RebindingDNS("hooks.rebind.test", [answer])
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    backend = CheckedNetworkBackend(allow_private=False)

    with pytest.raises(UnsafeWebhookURLError) as caught:
        await backend.connect_tcp("hooks.rebind.test", 443, timeout=5)

    assert caught.value.reason == reason
    assert dns.lookups == 1


async def test_checked_backend_rejects_unresolvable_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail_lookup(*args: object, **kwargs: object) -> list[tuple[object, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail_lookup)
    backend = CheckedNetworkBackend(allow_private=False)

    with pytest.raises(UnsafeWebhookURLError) as caught:
        await backend.connect_tcp("missing.invalid", 443, timeout=5)

    assert caught.value.reason == "unresolvable_host"


async def test_checked_backend_connects_to_loopback_when_allowed() -> None:
    receiver = WebhookReceiver([200])
    async with serve_app(receiver) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        backend = CheckedNetworkBackend(allow_private=True)
        stream = await backend.connect_tcp("localhost", port, timeout=5)
        await stream.aclose()

    assert isinstance(stream, httpcore.AsyncNetworkStream)
