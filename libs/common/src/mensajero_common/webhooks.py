"""Webhook events, signatures and URL safety, shared by the API and the webhook-sender.

Each delivery carries two signatures over the same bytes:
- `X-Webhook-Signature: sha256=<hex>`, the HMAC-SHA256 of "{timestamp}.{body}" keyed with the
  secret's UTF-8 bytes, with `X-Webhook-Timestamp` (Unix seconds) and `X-Webhook-Id`;
- the Standard Webhooks headers (`webhook-id`, `webhook-timestamp`,
  `webhook-signature: v1,<base64>`), the HMAC-SHA256 of "{id}.{timestamp}.{body}" keyed with
  the base64-decoded part of a `whsec_` secret, so that their verifier libraries work. A
  secret chosen by the user without that prefix signs with its UTF-8 bytes instead.
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import idna

EVENT_SMS_RECEIVED = "sms_received"
EVENT_SMS_SENT = "sms_sent"
EVENT_SMS_DELIVERED = "sms_delivered"
EVENT_SMS_FAILED = "sms_failed"
EVENTS = (EVENT_SMS_RECEIVED, EVENT_SMS_SENT, EVENT_SMS_DELIVERED, EVENT_SMS_FAILED)

# The User-Agent of every webhook POST, test events included.
USER_AGENT = "Mensajero-Webhooks/0.1"

SECRET_PREFIX = "whsec_"

# Codes of `webhookconfig.disabled_reason`, why the webhook-sender deactivated a webhook.
# `gone`: the endpoint responded with 410 Gone, which means it no longer exists.
DISABLED_GONE = "gone"
DISABLED_REASONS = (DISABLED_GONE,)

# A DNS label of letters, digits, hyphens and underscores, 1 to 63 characters, with no
# hyphen at either end. RFC 1123 host names have no underscores, but Docker Compose
# service names may have them, and Docker's DNS resolves them.
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# A last label that is a number (`127.1`, `0x7f`). The WHATWG URL standard parses such a
# host as an IPv4 address or rejects it, glibc's getaddrinfo reads `127.1` as 127.0.0.1,
# and no top-level domain is numeric. A dotted-quad address is accepted before this check.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_MAX_HOST_NAME_LENGTH = 253
# ASCII control characters, which urlsplit drops (tab, CR, LF) or keeps in the host.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _standard_key(secret: str) -> bytes:
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Return the `X-Webhook-Signature` value for `body` sent at `timestamp`."""
    digest = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return f"sha256={digest}"


def sign_standard(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """Return the Standard Webhooks `webhook-signature` value."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(_standard_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(
    secret: str, event_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Webhook-Id": event_id,
        "X-Webhook-Timestamp": str(timestamp),
        "X-Webhook-Signature": sign(secret, timestamp, body),
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_standard(secret, event_id, timestamp, body),
    }


def verify(secret: str, timestamp: int, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


@dataclass
class UnsafeWebhookURLError(ValueError):
    """A webhook URL that may not be used; `reason` is a machine code.

    `url` is the whole URL, except when a connection's resolver rejects the host. That
    resolver receives only the host name, so `url` is the host name.
    """

    url: str
    reason: str

    def __str__(self) -> str:
        return f"webhook URL rejected ({self.reason}): {self.url}"


# IPv6 ranges whose last 32 bits are an IPv4 address that a router or a translator on
# the path may deliver to: IPv4-compatible (RFC 4291), IPv4-translated (RFC 2765) and the
# NAT64 well-known prefix (RFC 6052). The IPv4-mapped range has `ipv4_mapped`.
_EMBEDDING_IPV4 = (
    ipaddress.IPv6Network("::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("64:ff9b::/96"),
)
# The NAT64 prefix for local use (RFC 8215) leads only to networks of the host's own
# operator, so no address in it is public.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address that `address` carries for a translator, if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    # :: and ::1 are the IPv6 unspecified and loopback addresses, not IPv4 ones.
    if int(address) > 1 and any(address in network for network in _EMBEDDING_IPV4):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return False
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            address = embedded
    # is_global is False for loopback, RFC 1918, link-local (169.254.0.0/16, where cloud
    # metadata services listen), unique-local, shared (100.64.0.0/10) and reserved ranges.
    return address.is_global and not address.is_multicast


def _is_valid_host_name(host: str) -> bool:
    """Tell whether `host` is a DNS name, in ASCII or as an internationalized (IDNA) name."""
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return False
    name = host.removesuffix(".")
    if not name or len(name) > _MAX_HOST_NAME_LENGTH:
        return False

    labels = name.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return False
    for label in labels:
        if not _HOST_LABEL.fullmatch(label):
            return False
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError):
                return False
    return True


def _is_valid_host(netloc: str, hostname: str) -> bool:
    """Tell whether `hostname`, the lowercased host of `netloc`, is a name or IP literal."""
    if "[" in netloc:
        try:
            ipaddress.IPv6Address(hostname)
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(hostname)
    except ValueError:
        return _is_valid_host_name(hostname)
    return True


def check_url_syntax(url: str, *, require_https: bool) -> tuple[str, int]:
    """Check scheme and host of `url`; return the host and port to resolve.

    A URL with control characters, without a scheme, with a port out of 1 to 65535, or
    with a host that is neither a DNS name nor an IP literal is `invalid_url`.
    """
    if _CONTROL_CHARACTERS.search(url):
        raise UnsafeWebhookURLError(url, "invalid_url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeWebhookURLError(url, "invalid_url") from None
    if not parts.scheme:
        raise UnsafeWebhookURLError(url, "invalid_url")
    if parts.scheme not in ("http", "https"):
        raise UnsafeWebhookURLError(url, "unsupported_scheme")
    if require_https and parts.scheme != "https":
        raise UnsafeWebhookURLError(url, "https_required")
    if not parts.hostname:
        raise UnsafeWebhookURLError(url, "missing_host")
    if parts.username or parts.password:
        raise UnsafeWebhookURLError(url, "credentials_in_url")
    if port == 0 or not _is_valid_host(parts.netloc, parts.hostname):
        raise UnsafeWebhookURLError(url, "invalid_url")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def check_addresses(url: str, addresses: Sequence[str]) -> None:
    """Raise `private_address` unless `addresses` is not empty and every one is public.

    One private address rejects the whole host, because the client may connect to any of
    them. An IPv6 zone suffix (`%eth0`) is ignored.
    """
    if not addresses:
        raise UnsafeWebhookURLError(url, "private_address")
    for address in addresses:
        if not _is_public(ipaddress.ip_address(address.split("%")[0])):
            raise UnsafeWebhookURLError(url, "private_address")


async def resolve_public_addresses(url: str, host: str, port: int) -> list[str]:
    """Resolve `host` and return its addresses if every one is public.

    Raises UnsafeWebhookURLError with `unresolvable_host` when the lookup fails, and
    `private_address` as check_addresses does. An IP address as `host` is checked without
    a lookup.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        check_addresses(url, [host])
        return [host]

    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )
    except OSError:
        raise UnsafeWebhookURLError(url, "unresolvable_host") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    check_addresses(url, addresses)
    return addresses


async def check_url_target(
    url: str, *, require_https: bool, allow_private: bool
) -> None:
    """Reject `url` unless every address its host resolves to may be reached.

    This check alone does not stop DNS rebinding, because the HTTP client resolves the
    host again when it connects. The clients that POST webhooks check the addresses of
    that second lookup too: `webhook_transport.create_webhook_client` for httpx, and the
    webhook-sender's aiohttp resolver.
    """
    host, port = check_url_syntax(url, require_https=require_https)
    if allow_private:
        return
    await resolve_public_addresses(url, host, port)


# Kinds of failed connections, recorded as "connection_error: <kind>" whichever HTTP
# client made the attempt (httpx for the API's test, aiohttp for the sender).
CONNECT_FAILED = "connect_failed"
TLS_FAILED = "tls_failed"
DISCONNECTED = "disconnected"
PROTOCOL_ERROR = "protocol_error"


def connection_error(kind: str) -> str:
    """Return the recorded error of an attempt whose connection failed in this way."""
    return f"connection_error: {kind}"


def _caused_by_ssl_error(error: BaseException) -> bool:
    """Tell whether an ssl.SSLError is among the exceptions that led to `error`.

    The chain is followed through `__context__` as well as `__cause__`, because the
    connection pool of httpcore 1.0.9 re-raises a failed connection's error `from None`.
    That clears the link to the SSLError in `__cause__` but keeps it in `__context__`.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _httpx_failure(error: httpx.HTTPError) -> str:
    """Return the kind of connection failure behind an httpx error."""
    if isinstance(error, httpx.ConnectError):
        return TLS_FAILED if _caused_by_ssl_error(error) else CONNECT_FAILED
    if isinstance(error, httpx.ReadError | httpx.WriteError):
        return DISCONNECTED
    # httpx reports a server that closes without a response as a protocol error.
    if isinstance(error, httpx.RemoteProtocolError) and "disconnected" in str(error):
        return DISCONNECTED
    if isinstance(error, httpx.ProtocolError | httpx.DecodingError):
        return PROTOCOL_ERROR
    return type(error).__name__


@dataclass(frozen=True)
class AttemptResult:
    """The outcome of one POST: a status code, or an error when no response came."""

    started_at: float
    duration_ms: int
    status_code: int | None = None
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class AttemptClock:
    """The start of one delivery attempt, which its result is timed from."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self._started = time.perf_counter()

    def result(
        self, *, status_code: int | None = None, error: str | None = None
    ) -> AttemptResult:
        """Return the attempt's outcome, with the time since its start."""
        duration_ms = int((time.perf_counter() - self._started) * 1000)
        return AttemptResult(
            self.started_at, duration_ms, status_code=status_code, error=error
        )


async def check_attempt_url(
    clock: AttemptClock, url: str, *, require_https: bool, allow_private: bool
) -> AttemptResult | None:
    """Check `url` with check_url_target; return the failed attempt if it is rejected."""
    try:
        await check_url_target(
            url, require_https=require_https, allow_private=allow_private
        )
    except UnsafeWebhookURLError as error:
        return clock.result(error=error.reason)
    return None


async def post_event(
    client: httpx.AsyncClient,
    *,
    url: str,
    secret: str,
    event_id: str,
    body: bytes,
    timeout_s: float,
    require_https: bool,
    allow_private: bool,
) -> AttemptResult:
    """POST one signed event to `url` and return what happened; never raises for the network.

    Redirects are not followed, so a public URL cannot bounce the request to a private one.
    Only a `client` from `webhook_transport.create_webhook_client` checks the addresses it
    connects to. The webhook-sender posts through its own aiohttp client
    (`mensajero_webhooks.delivery.http_client`) with the same checks and headers.

    `timeout_s` bounds the whole attempt: httpx's own timeout applies to each read, so
    an endpoint that sends its response a byte at a time could hold it far longer. Only
    the status line and headers are read: the body is never loaded, whatever its size.
    """
    clock = AttemptClock()
    rejected = await check_attempt_url(
        clock, url, require_https=require_https, allow_private=allow_private
    )
    if rejected is not None:
        return rejected

    headers = signature_headers(secret, event_id, int(clock.started_at), body)
    try:
        async with (
            asyncio.timeout(timeout_s),
            client.stream(
                "POST",
                url,
                content=body,
                headers=headers,
                timeout=timeout_s,
                follow_redirects=False,
            ) as response,
        ):
            status_code = response.status_code
    except UnsafeWebhookURLError as error:
        # A client from create_webhook_client rejected the addresses of its own lookup.
        return clock.result(error=error.reason)
    except (httpx.TimeoutException, TimeoutError):
        return clock.result(error="timeout")
    except httpx.HTTPError as error:
        return clock.result(error=connection_error(_httpx_failure(error)))
    return clock.result(status_code=status_code)
