"""A request body size limit that returns the 413 error envelope.

FastAPI's own `max_body_size` returns a plain text body when the declared Content-Length
is too large, so the API enforces the limit here instead.
"""

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mensajero_api.errors import MAX_BODY_SCOPE_KEY, handle_http_error


class RequestBodyLimitMiddleware:
    """Reject a request whose body is longer than `max_body_bytes` with 413 payload_too_large."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        scope[MAX_BODY_SCOPE_KEY] = self.max_body_bytes
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            response = await handle_http_error(
                Request(scope), HTTPException(status_code=413)
            )
            await response(scope, receive, send)
            return

        received_bytes = 0

        async def receive_within_limit() -> Message:
            nonlocal received_bytes
            message = await receive()
            if message["type"] == "http.request":
                received_bytes += len(message.get("body", b""))
                # A chunked body has no Content-Length, so it is counted as it arrives.
                # FastAPI re-raises an HTTPException from reading the body, and the
                # exception handlers render it.
                if received_bytes > self.max_body_bytes:
                    raise HTTPException(status_code=413)
            return message

        await self.app(scope, receive_within_limit, send)
