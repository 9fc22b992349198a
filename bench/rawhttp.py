"""A minimal HTTP/1.1 keep-alive client for load generation.

httpx spends more CPU per request than a small uvicorn app does, so on a 2-core machine a
load generator built on it would measure itself. This client writes prebuilt request
bytes and reads only the status line, Content-Length and body, which is all that a
benchmark of our own servers needs. It handles no chunked responses, redirects or TLS.
"""

import asyncio
import contextlib
from dataclasses import dataclass

HEADER_END = b"\r\n\r\n"
MAX_HEADER_BYTES = 64 * 1024


class ResponseError(Exception):
    """The server sent something this client cannot read as an HTTP/1.1 response."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


def build_request(
    method: str,
    host: str,
    port: int,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    """Return the bytes of one request with a JSON body (or none)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        lowered = name.strip().lower()
        if lowered == b"content-length":
            return int(value.strip())
        if lowered == b"transfer-encoding":
            raise ResponseError("chunked responses are not supported")
    return 0


class HttpConnection:
    """One keep-alive connection; requests on it run one after another."""

    def __init__(self, host: str, port: int, local_address: str | None = None) -> None:
        self.host = host
        self.port = port
        self.local_address = local_address
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        local = (self.local_address, 0) if self.local_address else None
        self._reader, self._writer = await asyncio.open_connection(
            self.host, self.port, local_addr=local, limit=MAX_HEADER_BYTES
        )

    async def request(self, raw_request: bytes) -> Response:
        """Send one prebuilt request and read its response, reconnecting if needed."""
        if self._writer is None or self._writer.is_closing():
            await self.connect()
        assert self._reader is not None and self._writer is not None
        self._writer.write(raw_request)
        try:
            head = await self._reader.readuntil(HEADER_END)
        except asyncio.IncompleteReadError as error:
            await self.close()
            raise ResponseError("connection closed before the response") from error
        try:
            status = int(head[9:12])
        except ValueError as error:
            raise ResponseError(f"invalid status line {head[:40]!r}") from error
        body = await self._reader.readexactly(_content_length(head))
        if b"\r\nconnection: close" in head.lower():
            await self.close()
        return Response(status, body)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is None:
            return
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
