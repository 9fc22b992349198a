"""`WS /api/v1/android/ws?api_key=…`: the WebSocket transport of device sessions.

This layer only accepts, reads, sends and closes, and every decision is the session's.
`HubApp` calls it without going through the FastAPI app, whose HTTP middleware does
nothing for WebSockets. An idle connection then keeps a few suspended coroutine frames
instead of a chain through every middleware and router, and each message in or out
skips those layers too. The API key travels in the query string, so nothing here logs
the URL.
"""

import contextlib
from typing import Any
from urllib.parse import parse_qsl

import structlog
from starlette.types import Receive, Scope, Send

from mensajero_common import jsonutil
from mensajero_common.i18n import negotiate_language
from mensajero_common.throttle import client_address
from mensajero_hub.core.hub import Hub

log = structlog.get_logger(__name__)

WS_PATH = "/api/v1/android/ws"
# Close code a WebSocket endpoint receives when the connection dropped without a close frame.
CLOSE_ABNORMAL = 1006


class WebSocketTransport:
    """The sending side of one device connection, over uvicorn's ASGI `send`."""

    __slots__ = ("_send", "open")

    def __init__(self, send: Send) -> None:
        self._send = send
        # False once this side sent a close frame or the peer's disconnect was read.
        self.open = True

    async def send(self, frame: dict[str, Any]) -> bool:
        if not self.open:
            return False
        try:
            await self._send(
                {"type": "websocket.send", "text": jsonutil.dumps_str(frame)}
            )
        except (OSError, RuntimeError):
            # uvicorn raises ClientDisconnected (an OSError) once the peer is gone, and
            # RuntimeError after a close that another task sent.
            return False
        return True

    async def close(self, code: int, reason: str) -> None:
        if not self.open:
            return
        self.open = False
        with contextlib.suppress(OSError, RuntimeError):
            await self._send(
                {"type": "websocket.close", "code": code, "reason": reason}
            )


async def serve_device(hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
    """Run one device connection from the handshake to the release of its session."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return

    language = negotiate_language(
        _header(scope, b"accept-language"), hub.settings.DEFAULT_LANGUAGE
    )
    # Accept before authenticating, so a rejected phone reads the close code and reason;
    # a refused handshake would only show an HTTP 403.
    await send({"type": "websocket.accept"})
    transport = WebSocketTransport(send)
    session = await hub.open_session(
        transport, _api_key(scope), language, client_address(scope)
    )
    if session is None:
        return

    # The read loop is written out here, not in a function of its own, because every
    # idle connection keeps one suspended coroutine frame per level.
    code = CLOSE_ABNORMAL
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                transport.open = False
                code = int(message.get("code") or CLOSE_ABNORMAL)
                return

            text = message.get("text")
            if text is not None:
                await session.handle_text(text)
            else:
                await session.handle_binary(len(message.get("bytes") or b""))
    finally:
        await hub.release(session, code)


def _header(scope: Scope, name: bytes) -> str | None:
    """Return the first value of a request header. uvicorn gives names in lower case."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _api_key(scope: Scope) -> str | None:
    """Return the `api_key` query parameter, the last one when it is repeated."""
    query = scope.get("query_string", b"").decode("latin-1")
    api_key = None
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "api_key":
            api_key = value
    return api_key
