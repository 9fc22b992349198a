"""Signed webhook POSTs on an aiohttp connection pool.

The sender posts with aiohttp rather than httpx because it costs far less CPU per POST.
With 50 POSTs in flight from one process to `bench/tools/sink.py`, on the 2-core machine
of docs/benchmarks.md, httpx 0.29's transport (httpcore 1.0.9 on anyio) used 1.1 to
1.7 ms per POST and aiohttp 3.14 about 0.06 ms. The pool keeps what the httpx transport
guaranteed: redirects are not followed, cookies are never stored, the certificate
authorities are httpx's, and no request is logged.
"""

import aiohttp
import httpx

from mensajero_common.settings import Settings
from mensajero_common.webhooks import (
    AttemptClock,
    AttemptResult,
    check_attempt_url,
    signature_headers,
)

USER_AGENT = "Mensajero-Webhooks/0.1"
# httpx's default expiry of idle connections. Servers that close idle connections after
# 5 s (uvicorn's default) then get the same connection reuse as with httpx.
KEEPALIVE_EXPIRY_S = 5.0
# The response body is read and discarded up to this size, so that the connection can
# carry the next POST. A longer body closes the connection instead, so a hostile endpoint
# cannot make the sender read without end.
MAX_RESPONSE_BODY_BYTES = 64 * 1024


def create_http_session(settings: Settings) -> aiohttp.ClientSession:
    """Open the connection pool: WEBHOOK_CONCURRENCY connections, shared by every webhook.

    Cookies are neither stored nor sent, so a cookie that one user's endpoint sets never
    reaches another user's webhook on the same host. Proxy variables are ignored. Responses
    are not decompressed, because the sender never looks at their bodies.
    """
    connector = aiohttp.TCPConnector(
        limit=settings.WEBHOOK_CONCURRENCY,
        keepalive_timeout=KEEPALIVE_EXPIRY_S,
        # The certificate authorities httpx trusts: certifi's bundle, or SSL_CERT_FILE or
        # SSL_CERT_DIR when set.
        ssl=httpx.create_ssl_context(),
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

    `url` is checked with `check_url_target` first. Redirects are not followed, so a public
    URL cannot bounce the request to a private one. `timeout_s` bounds the request from
    connecting to the end of the response body, but not the URL check's DNS lookup.
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
    except TimeoutError:
        # aiohttp's ServerTimeoutError is a TimeoutError too.
        return clock.result(error="timeout")
    except aiohttp.ClientError as error:
        return clock.result(error=f"connection_error: {type(error).__name__}")
    return clock.result(status_code=status_code)


async def _discard_body(response: aiohttp.ClientResponse) -> None:
    """Read the body to its end, or close the connection once it passes the maximum."""
    remaining = MAX_RESPONSE_BODY_BYTES
    while chunk := await response.content.readany():
        remaining -= len(chunk)
        if remaining < 0:
            response.close()
            return
