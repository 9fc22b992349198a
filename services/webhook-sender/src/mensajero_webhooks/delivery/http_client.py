"""Signed webhook POSTs on an aiohttp connection pool.

The sender posts with aiohttp rather than httpx because it costs far less CPU per POST.
With 50 POSTs in flight from one process to `bench/tools/sink.py`, on the 2-core machine
of docs/benchmarks.md, httpx 0.29's transport (httpcore 1.0.9 on anyio) used 1.1 to
1.7 ms per POST and aiohttp 3.14 about 0.06 ms. The pool keeps what the httpx transport
guaranteed: redirects are not followed, cookies are never stored, the certificate
authorities are httpx's, and no request is logged.

Unless private URLs are allowed, the pool resolves host names with PublicAddressResolver,
so every connection, pooled ones included, goes only to addresses that passed the same
check as `check_url_target`. A DNS answer that changes after that check therefore cannot
reach a private address.
"""

import socket

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult

from mensajero_common.settings import Settings
from mensajero_common.webhooks import (
    CONNECT_FAILED,
    DISCONNECTED,
    PROTOCOL_ERROR,
    TLS_FAILED,
    USER_AGENT,
    AttemptClock,
    AttemptResult,
    UnsafeWebhookURLError,
    check_addresses,
    check_attempt_url,
    connection_error,
    signature_headers,
)

# httpx's default expiry of idle connections. Servers that close idle connections after
# 5 s (uvicorn's default) then get the same connection reuse as with httpx.
KEEPALIVE_EXPIRY_S = 5.0
# The response body is read and discarded up to this size, so that the connection can
# carry the next POST. A longer body closes the connection instead, so a hostile endpoint
# cannot make the sender read without end.
MAX_RESPONSE_BODY_BYTES = 64 * 1024


class PublicAddressResolver(AbstractResolver):
    """Resolve with aiohttp's ThreadedResolver; reject a host with any non-public address.

    A rejection raises UnsafeWebhookURLError(`private_address`) from the connection
    attempt, and aiohttp does not cache it. The connector caches accepted answers for its
    DNS cache TTL (10 s by default in aiohttp 3.14) and connects only to those. aiohttp
    does not call the resolver for a URL whose host is an IP address, so
    `check_url_target` is what checks such a URL.
    """

    def __init__(self) -> None:
        # aiohttp's default resolver too, unless aiodns is installed.
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        check_addresses(host, [result["host"] for result in results])
        return results

    async def close(self) -> None:
        await self._resolver.close()


def create_http_session(settings: Settings) -> aiohttp.ClientSession:
    """Open the connection pool: WEBHOOK_CONCURRENCY connections, shared by every webhook.

    Cookies are neither stored nor sent, so a cookie that one user's endpoint sets never
    reaches another user's webhook on the same host. Proxy variables are ignored. Responses
    are not decompressed, because the sender never looks at their bodies. Unless
    `webhook_private_urls_allowed`, host names are resolved with PublicAddressResolver.
    """
    resolver = (
        None if settings.webhook_private_urls_allowed else PublicAddressResolver()
    )
    connector = aiohttp.TCPConnector(
        limit=settings.WEBHOOK_CONCURRENCY,
        keepalive_timeout=KEEPALIVE_EXPIRY_S,
        # The certificate authorities httpx trusts: certifi's bundle, or SSL_CERT_FILE or
        # SSL_CERT_DIR when set.
        ssl=httpx.create_ssl_context(),
        resolver=resolver,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": USER_AGENT},
        skip_auto_headers=("Accept-Encoding",),
        auto_decompress=False,
        trust_env=False,
    )


async def post_event(
    session: aiohttp.ClientSession,
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

    `url` is checked with `check_url_target` first, and a session from
    create_http_session checks the addresses of each new connection again. Redirects are
    not followed, so a public URL cannot bounce the request to a private one. `timeout_s`
    bounds the request from connecting to the end of the response body, but not the URL
    check's DNS lookup.
    """
    clock = AttemptClock()
    rejected = await check_attempt_url(
        clock, url, require_https=require_https, allow_private=allow_private
    )
    if rejected is not None:
        return rejected

    headers = signature_headers(secret, event_id, int(clock.started_at), body)
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            await _discard_body(response)
            status_code = response.status
    except UnsafeWebhookURLError as error:
        # PublicAddressResolver rejected the addresses of the lookup for this connection.
        return clock.result(error=error.reason)
    except TimeoutError:
        # aiohttp's ServerTimeoutError is a TimeoutError too.
        return clock.result(error="timeout")
    except aiohttp.ClientError as error:
        return clock.result(error=connection_error(_aiohttp_failure(error)))
    return clock.result(status_code=status_code)


def _aiohttp_failure(error: aiohttp.ClientError) -> str:
    """Return the kind of connection failure behind an aiohttp error, named as for the
    API's httpx client."""
    # The TLS errors subclass ClientConnectorError, so they are checked first.
    if isinstance(error, aiohttp.ClientSSLError):
        return TLS_FAILED
    if isinstance(error, aiohttp.ClientConnectorError):
        return CONNECT_FAILED
    if isinstance(error, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return DISCONNECTED
    if isinstance(error, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return PROTOCOL_ERROR
    return type(error).__name__


async def _discard_body(response: aiohttp.ClientResponse) -> None:
    """Read the body to its end, or close the connection once it passes the maximum."""
    remaining = MAX_RESPONSE_BODY_BYTES
    while chunk := await response.content.readany():
        remaining -= len(chunk)
        if remaining < 0:
            response.close()
            return
