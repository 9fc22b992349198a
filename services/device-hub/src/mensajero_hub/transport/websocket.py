"""`WS /api/v1/android/ws?api_key=…`: the WebSocket transport of device sessions.

This layer only accepts, reads, sends and closes, and every decision is the session's.
The API key travels in the query string, so nothing here logs the URL.
"""

import contextlib
from typing import Any

import structlog
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from mensajero_common import jsonutil
from mensajero_common.i18n import negotiate_language
from mensajero_hub.core.hub import Hub
from mensajero_hub.core.session import DeviceSession

log = structlog.get_logger(__name__)

router = APIRouter()

# Close code a WebSocket endpoint receives when the connection dropped without a close frame.
CLOSE_ABNORMAL = 1006


class WebSocketTransport:
    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket

    async def send(self, frame: dict[str, Any]) -> bool:
        if self._websocket.application_state != WebSocketState.CONNECTED:
            return False
        try:
            await self._websocket.send_text(jsonutil.dumps_str(frame))
        except (WebSocketDisconnect, RuntimeError, OSError):
            # RuntimeError: Starlette refuses sends after a close from another task.
            return False
        return True

    async def close(self, code: int, reason: str) -> None:
        if self._websocket.application_state != WebSocketState.CONNECTED:
            return
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await self._websocket.close(code, reason)


@router.websocket("/api/v1/android/ws")
async def device_websocket(websocket: WebSocket) -> None:
    hub: Hub = websocket.app.state.hub
    language = negotiate_language(
        websocket.headers.get("accept-language"), hub.settings.DEFAULT_LANGUAGE
    )
    # Accept before authenticating, so a rejected phone reads the close code and reason;
    # a refused handshake would only show an HTTP 403.
    await websocket.accept()
    transport = WebSocketTransport(websocket)
    session = await hub.open_session(
        transport, websocket.query_params.get("api_key"), language
    )
    if session is None:
        return

    code = CLOSE_ABNORMAL
    try:
        code = await _read_frames(websocket, session)
    finally:
        await hub.release(session, code)


async def _read_frames(websocket: WebSocket, session: DeviceSession) -> int:
    """Feed every frame to the session until the connection ends; return the close code."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return int(message.get("code") or CLOSE_ABNORMAL)

        text = message.get("text")
        if text is not None:
            await session.handle_text(text)
        else:
            await session.handle_binary(len(message.get("bytes") or b""))
