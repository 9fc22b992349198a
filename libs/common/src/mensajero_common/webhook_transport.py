"""An httpx client for webhook POSTs that connects only to checked addresses.

httpx 0.29's `AsyncHTTPTransport` resolves the host inside httpcore and takes no resolver
or network backend, so a DNS answer that changes after `check_url_target` would reach a
private address. httpcore lets a connection pool take a custom network backend, so this
module wraps such a pool in an httpx transport. The backend resolves the host itself,
checks every address and connects to those addresses only. The pool, the TLS handshake
and the Host header still use the URL's host name, so the certificate is verified for
that name.
"""

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from contextlib import contextmanager

import httpcore
import httpx

from mensajero_common.webhooks import USER_AGENT, resolve_public_addresses

# httpcore raises its own exceptions, and httpx's transport maps them to the httpx
# classes of the same name. Subclasses come before their bases.
_HTTPX_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextmanager
def _httpx_errors(request: httpx.Request) -> Iterator[None]:
    """Raise httpcore's exceptions as the httpx exceptions that callers catch."""
    try:
        yield
    except Exception as error:
        for httpcore_error, httpx_error in _HTTPX_ERRORS:
            if isinstance(error, httpcore_error):
                raise httpx_error(str(error), request=request) from error
        raise


class CheckedNetworkBackend(httpcore.AsyncNetworkBackend):
    """A network backend that opens TCP connections only to public addresses.

    Each connection resolves the host once, rejects it with UnsafeWebhookURLError
    (`unresolvable_host` or `private_address`) unless every address is public, and then
    tries the addresses in order within the connect timeout. With `allow_private` true
    (WEBHOOK_ALLOW_PRIVATE_URLS) it connects without the check.
    """

    def __init__(self, *, allow_private: bool) -> None:
        self._allow_private = allow_private
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        # httpcore's interface names this parameter: the connect timeout in seconds.
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self._allow_private:
            return await self._backend.connect_tcp(
                host,
                port,
                timeout=timeout,
                local_address=local_address,
                socket_options=socket_options,
            )

        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                addresses = await resolve_public_addresses(host, host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(
                f"resolving {host} timed out after {timeout} s"
            ) from None

        last_error: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in addresses:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                return await self._backend.connect_tcp(
                    address,
                    port,
                    timeout=remaining,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last_error = error
        if last_error is not None:
            raise last_error
        raise httpcore.ConnectTimeout(f"connecting to {host} timed out")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes], request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors(self._request):
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()


class CheckedTransport(httpx.AsyncBaseTransport):
    """An httpx transport over an httpcore pool that connects with CheckedNetworkBackend.

    It trusts the certificate authorities of `httpx.create_ssl_context()` and uses no
    proxy, because a proxy would resolve the host itself.
    """

    def __init__(self, *, allow_private: bool) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            network_backend=CheckedNetworkBackend(allow_private=allow_private),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors(request):
            core_response = await self._pool.handle_async_request(core_request)
        assert isinstance(core_response.stream, AsyncIterable)

        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=_ResponseStream(core_response.stream, request),
            extensions=core_response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


def create_webhook_client(*, allow_private: bool) -> httpx.AsyncClient:
    """Open an httpx client for `webhooks.post_event` that checks the addresses it uses.

    Environment proxies are ignored (`trust_env=False`), for the reason CheckedTransport
    gives.
    """
    return httpx.AsyncClient(
        transport=CheckedTransport(allow_private=allow_private),
        trust_env=False,
        headers={"User-Agent": USER_AGENT},
    )
