"""Idle WebSocket phones: many connections that register, ping on schedule and wait.

A phone here is an asyncio.Protocol with no task of its own, so one process holds tens
of thousands of connections. Each connection binds a source address of its own range
(127.0.0.2, 127.0.0.3, ...) because loopback gives each source address only about
28,000 ephemeral ports. Commands (JSON on stdin):

- connect: open every connection, send `register`, wait for the first reply of each.
- probe: send "probe" on a sample of connections and measure the one-way latency of the
  bare server's stamped reply (bench.tools.bare_ws).
- status: counts of open connections, replies and pings.
- stop: close every connection.
"""

import asyncio
import base64
import heapq
import os
import random
import struct
import time
from typing import Any

import orjson

from bench.stats import summarize_ms
from bench.toolmain import CommandHandler, run_command_tool

OPCODE_TEXT = 0x1
OPCODE_CLOSE = 0x8
OPCODE_PING = 0x9
OPCODE_PONG = 0xA
CONNECT_TIMEOUT_S = 60.0
PING_TICK_S = 0.05


def encode_client_frame(payload: bytes, opcode: int = OPCODE_TEXT) -> bytes:
    """Return a masked client frame (RFC 6455 requires clients to mask)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return header + mask + masked


class Phone(asyncio.Protocol):
    def __init__(self, fleet: "Fleet", request: bytes) -> None:
        self.fleet = fleet
        self.request = request
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport: Any = None
        self.buffer = bytearray()
        self.upgraded = False
        self.closed = False
        self.first_reply: asyncio.Future[None] = fleet.loop.create_future()
        self.probe_reply: asyncio.Future[int] | None = None
        self.replies = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.fleet.open_count -= 1 if self.upgraded else 0
        if not self.first_reply.done():
            self.first_reply.set_exception(ConnectionError("closed before the reply"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line = bytes(self.buffer[: self.buffer.find(b"\r\n")])
            if b" 101 " not in status_line:
                self.first_reply.set_exception(
                    ConnectionError(status_line.decode(errors="replace"))
                )
                self.abort()
                return
            del self.buffer[: end + 4]
            self.upgraded = True
            self.fleet.open_count += 1
            self.send(self.fleet.register_frame)
        self._read_frames()

    def _read_frames(self) -> None:
        while len(self.buffer) >= 2:
            first, second = self.buffer[0], self.buffer[1]
            length, offset = second & 0x7F, 2
            if length == 126:
                if len(self.buffer) < 4:
                    return
                length, offset = struct.unpack_from("!H", self.buffer, 2)[0], 4
            elif length == 127:
                if len(self.buffer) < 10:
                    return
                length, offset = struct.unpack_from("!Q", self.buffer, 2)[0], 10
            if len(self.buffer) < offset + length:
                return
            payload = bytes(self.buffer[offset : offset + length])
            del self.buffer[: offset + length]
            self._on_frame(first & 0x0F, payload)

    def _on_frame(self, opcode: int, payload: bytes) -> None:
        if opcode == OPCODE_CLOSE:
            self.abort()
            return
        if opcode == OPCODE_PING:
            self.send(payload, OPCODE_PONG)
            return
        received_ns = time.monotonic_ns()
        self.replies += 1
        self.fleet.replies += 1
        if not self.first_reply.done():
            self.first_reply.set_result(None)
        probe = self.probe_reply
        if probe is not None and not probe.done() and payload.startswith(b'{"t":'):
            probe.set_result(received_ns - orjson.loads(payload)["t"])

    def send(self, payload: bytes, opcode: int = OPCODE_TEXT) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(encode_client_frame(payload, opcode))

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class Fleet:
    def __init__(self, options: dict[str, Any]) -> None:
        self.loop = asyncio.get_running_loop()
        self.options = options
        self.phones: list[Phone] = []
        self.open_count = 0
        self.replies = 0
        self.pings = 0
        self.register_frame = orjson.dumps(
            {"type": "register", "protocol_version": 1, "app_version": "bench-idle"}
        )
        self.ping_frame = orjson.dumps({"type": "ping"})
        self._schedule: list[tuple[float, int]] = []
        self._pinger: asyncio.Task[None] | None = None

    def _handshake(self, api_key: str | None) -> bytes:
        path = self.options["path"]
        if api_key:
            path = f"{path}?api_key={api_key}"
        key = base64.b64encode(os.urandom(16)).decode()
        return (
            f"GET {path} HTTP/1.1\r\nHost: {self.options['host']}:{self.options['port']}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "User-Agent: mensajero-bench\r\n\r\n"
        ).encode()

    async def _open(self, index: int, api_key: str | None, source: str) -> bool:
        phone = Phone(self, self._handshake(api_key))
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self.loop.create_connection(
                    lambda: phone,
                    self.options["host"],
                    self.options["port"],
                    local_addr=(source, 0),
                )
                await phone.first_reply
        except (OSError, TimeoutError, ConnectionError):
            phone.abort()
            return False
        self.phones.append(phone)
        interval_s = self.options["ping_interval_s"]
        first_ping_at = time.monotonic() + random.uniform(0, interval_s)
        heapq.heappush(self._schedule, (first_ping_at, len(self.phones) - 1))
        return True

    async def connect(self, _: dict[str, Any]) -> dict[str, Any]:
        keys: list[str | None] = list(self.options.get("api_keys") or [])
        if not keys:
            keys = [None] * self.options["count"]
        sources: list[str] = self.options["local_addresses"]
        per_source = -(-len(keys) // len(sources))
        gate = asyncio.Semaphore(self.options.get("connect_concurrency", 100))
        self._pinger = asyncio.create_task(self._ping_forever())
        started = time.monotonic()

        async def open_one(index: int, key: str | None) -> bool:
            async with gate:
                return await self._open(index, key, sources[index // per_source])

        results = await asyncio.gather(
            *(open_one(index, key) for index, key in enumerate(keys))
        )
        return {
            "connected": sum(results),
            "failed": len(results) - sum(results),
            "elapsed_s": round(time.monotonic() - started, 3),
        }

    async def _ping_forever(self) -> None:
        interval_s = self.options["ping_interval_s"]
        while True:
            await asyncio.sleep(PING_TICK_S)
            now = time.monotonic()
            while self._schedule and self._schedule[0][0] <= now:
                due_at, index = heapq.heappop(self._schedule)
                phone = self.phones[index]
                if phone.closed:
                    continue
                phone.send(self.ping_frame)
                self.pings += 1
                heapq.heappush(self._schedule, (due_at + interval_s, index))

    async def probe(self, options: dict[str, Any]) -> dict[str, Any]:
        """Measure the one-way latency of stamped replies on a sample of connections."""
        samples_ms: list[float] = []
        open_phones = [phone for phone in self.phones if not phone.closed]
        for _ in range(options["count"]):
            phone = random.choice(open_phones)
            phone.probe_reply = self.loop.create_future()
            phone.send(b"probe")
            try:
                async with asyncio.timeout(5):
                    samples_ms.append(await phone.probe_reply / 1e6)
            except TimeoutError:
                pass
            phone.probe_reply = None
            await asyncio.sleep(options.get("interval_s", 0.005))
        return {"latency_ms": summarize_ms(samples_ms)}

    async def status(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "open": sum(1 for phone in self.phones if not phone.closed),
            "replies": self.replies,
            "pings": self.pings,
        }

    async def stop(self, _: dict[str, Any]) -> dict[str, Any]:
        if self._pinger is not None:
            self._pinger.cancel()
        status = await self.status({})
        for phone in self.phones:
            if phone.transport is not None and not phone.closed:
                phone.transport.close()
        await asyncio.sleep(0.5)
        return status


async def start(options: dict[str, Any]) -> dict[str, CommandHandler]:
    fleet = Fleet(options)
    return {
        "connect": fleet.connect,
        "probe": fleet.probe,
        "status": fleet.status,
        "stop": fleet.stop,
    }


if __name__ == "__main__":
    run_command_tool(start)
