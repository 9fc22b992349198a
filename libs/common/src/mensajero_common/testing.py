"""Helpers for the test suites of every package: real servers on port 0, scaled timeouts."""

import asyncio
import json
import os
import secrets
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.engine import make_url

from mensajero_common.settings import Settings


def scaled(seconds: float) -> float:
    """Scale a test timeout by MENSAJERO_TEST_TIMEOUT_SCALE (default 1), for slow machines."""
    return seconds * float(os.environ.get("MENSAJERO_TEST_TIMEOUT_SCALE", "1"))


# The lowest port that free_port hands out, above the usual ports of local servers
# (Postgres 5432, Redis 6379, web servers from 8000 to 9999).
FREE_PORT_MIN = 20_000
# Linux's default ephemeral range, for systems without /proc.
DEFAULT_EPHEMERAL_START = 32_768


def _ephemeral_start() -> int:
    """Return the first port of the range that the kernel gives outgoing connections."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
    except OSError:
        return DEFAULT_EPHEMERAL_START
    return int(text.split()[0])


def free_port() -> int:
    """Return a loopback TCP port that is free now, for a server started afterwards.

    The port is drawn at random below the kernel's ephemeral range. A port from that
    range (what binding port 0 gives) can be taken by any outgoing connection of a test
    running in parallel before the server binds it, and the server then fails to start.
    """
    start = _ephemeral_start()
    if start - FREE_PORT_MIN >= 1_000:
        for _ in range(1_000):
            port = FREE_PORT_MIN + secrets.randbelow(start - FREE_PORT_MIN)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    # No room below the ephemeral range, or no free port found there.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def settings_without_connections(settings: Settings) -> AsyncIterator[Settings]:
    """Yield a copy of `settings` whose DATABASE_URL names a new Postgres role that may
    open no connection, so every connection fails as on a server out of connections
    (SQLSTATE 53300). The role is dropped at the end."""
    url = make_url(settings.DATABASE_URL)
    role = f"mensajero_test_noconn_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(
        user=url.username,
        password=url.password,
        host=url.host,
        port=url.port,
        database=url.database,
    )
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
        try:
            limited_url = url.set(username=role).render_as_string(hide_password=False)
            yield settings.model_copy(update={"DATABASE_URL": limited_url})
        finally:
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        await admin.close()


@asynccontextmanager
async def serve_raw_reply(reply: bytes) -> AsyncIterator[int]:
    """Serve TCP on 127.0.0.1 that reads a request, writes `reply` and closes, and
    yield its port. An empty `reply` closes without a response, as a broken endpoint."""

    async def respond(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(respond, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def serve_app(app: Any, **config: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port; yield its base URL.

    With `ssl_certfile` and `ssl_keyfile` in `config`, uvicorn serves TLS and the URL is
    https.
    """
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", lifespan="on", ws="websockets-sansio", **config
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        scheme = "https" if config.get("ssl_certfile") else "http"
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, scaled(10))
        sock.close()


@dataclass(frozen=True)
class ServerCertificate:
    """PEM files of a TLS server certificate and of the certificate authority that
    issued it."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def issue_server_certificate(directory: Path, *hostnames: str) -> ServerCertificate:
    """Create a certificate authority and a server certificate for `hostnames`.

    Writes the PEM files into `directory`. The authority is new each time, so no client
    trusts it unless SSL_CERT_FILE names its `ca_file`. Needs trustme, a dev dependency.
    """
    import trustme

    authority = trustme.CA()
    certificate = authority.issue_cert(*hostnames)
    files = ServerCertificate(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )
    authority.cert_pem.write_to_path(str(files.ca_file))
    for index, pem in enumerate(certificate.cert_chain_pems):
        pem.write_to_path(str(files.cert_file), append=index > 0)
    certificate.private_key_pem.write_to_path(str(files.key_file))
    return files


def service_environment(settings: Settings, **variables: str) -> dict[str, str]:
    """Return this process's environment with the test's database, Redis and secrets.

    `variables` adds or overrides settings, such as the service's port.
    """
    return {
        **os.environ,
        "ENVIRONMENT": "test",
        "DATABASE_URL": settings.DATABASE_URL,
        "REDIS_URL": settings.REDIS_URL,
        "REDIS_KEY_PREFIX": settings.REDIS_KEY_PREFIX,
        "SECRET_KEY": settings.SECRET_KEY,
        "FIRST_SUPERUSER_PASSWORD": settings.FIRST_SUPERUSER_PASSWORD,
        **variables,
    }


@dataclass
class ServiceProcess:
    base_url: str
    process: asyncio.subprocess.Process
    # What the process wrote to stderr, set once it has stopped.
    stderr: str = ""


async def wait_healthy(base_url: str, process: asyncio.subprocess.Process) -> None:
    """Wait until `base_url`/healthz responds 200, or fail if the process exits first."""
    import httpx

    async with httpx.AsyncClient() as client, asyncio.timeout(scaled(15)):
        while True:
            if process.returncode is not None:
                raise AssertionError(
                    f"the process exited with {process.returncode} before /healthz "
                    "responded 200"
                )
            try:
                response = await client.get(f"{base_url}/healthz")
            except httpx.TransportError:
                await asyncio.sleep(0.1)
                continue
            if response.status_code == 200:
                return


@asynccontextmanager
async def run_service(
    module: str, port: int, env: Mapping[str, str]
) -> AsyncIterator[ServiceProcess]:
    """Run `python -m module` with the environment `env` until the block ends.

    The block starts once the service's /healthz on `port` responds 200. At the end the process
    gets SIGTERM, and its stderr is stored in the yielded ServiceProcess.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        env=dict(env),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    service = ServiceProcess(f"http://127.0.0.1:{port}", process)
    try:
        await wait_healthy(service.base_url, process)
        yield service
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(scaled(30)):
            _, stderr = await process.communicate()
        service.stderr = stderr.decode()


async def answer_lifespan(receive: Any, send: Any) -> None:
    """Serve an ASGI lifespan scope for an app that has nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class WebhookReceiver:
    """A real HTTP endpoint for webhook tests: records each request, answers as scripted.

    `responses` lists the status code of each request in turn (the last one repeats); a
    `delay_s` makes every answer that slow, to test timeouts.
    """

    def __init__(
        self, responses: list[int] | None = None, delay_s: float = 0.0
    ) -> None:
        self.responses = responses or [200]
        self.delay_s = delay_s
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        self.received = asyncio.Condition()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {
            name.decode().lower(): value.decode() for name, value in scope["headers"]
        }
        index = len(self.requests)
        self.requests.append((headers, body, asyncio.get_running_loop().time()))
        async with self.received:
            self.received.notify_all()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.responses[min(index, len(self.responses) - 1)]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})

    async def wait_for(self, count: int, timeout_s: float) -> None:
        """Wait until `count` requests have arrived, or raise TimeoutError."""
        async with asyncio.timeout(scaled(timeout_s)), self.received:
            await self.received.wait_for(lambda: len(self.requests) >= count)


class RebindingDNS:
    """A stand-in for `socket.getaddrinfo` whose answer for one host name changes.

    Install it with `monkeypatch.setattr(socket, "getaddrinfo", dns)`: asyncio's
    `loop.getaddrinfo`, and so every resolver built on it, calls `socket.getaddrinfo` at
    each lookup. The n-th lookup of `host` returns `answers[n]` (the last one repeats),
    and every other host goes to the real `socket.getaddrinfo`. `lookups` counts the
    lookups of `host`.
    """

    def __init__(self, host: str, answers: list[str]) -> None:
        self.host = host
        self.answers = answers
        self.lookups = 0
        self._getaddrinfo = socket.getaddrinfo

    def __call__(
        self,
        host: bytes | str | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:
        # anyio passes the host name IDNA-encoded, as bytes.
        name = host.decode() if isinstance(host, bytes) else host
        if name != self.host:
            return self._getaddrinfo(host, port, family, type, proto, flags)
        address = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        port_number = int(port) if port is not None else 0
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sockaddr = (
            (address, port_number, 0, 0)
            if address_family == socket.AF_INET6
            else (address, port_number)
        )
        return [(address_family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]


async def status_indexes_usable(
    connection: asyncpg.Connection,
    table: str,
    primary_key: str,
    statement: str,
    *args: Any,
) -> set[str]:
    """Return the indexes of `table` on its `status` column (as a key or in the
    predicate of a partial index) that Postgres can use for `statement`.

    Such an index is small and reads as nearly empty on statistics taken while no row
    was open, so Postgres prefers it to the primary key and then reads every open row on
    each call. A statement that takes rows by id should leave it no choice. The primary
    key is dropped (with the foreign keys that need it) in a transaction that is rolled
    back, and sequential scans are off, so the plan takes a status index whenever one can
    serve the statement. The statement is only planned, not run.
    """
    transaction = connection.transaction()
    await transaction.start()
    try:
        await connection.execute(
            f'ALTER TABLE "{table}" DROP CONSTRAINT "{primary_key}" CASCADE'
        )
        await connection.execute("SET LOCAL enable_seqscan = off")
        plan = await connection.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *args)
    finally:
        await transaction.rollback()
    # A connection with a json codec returns the plan decoded already.
    if isinstance(plan, str):
        plan = json.loads(plan)
    rows = await connection.fetch(
        "SELECT indexname FROM pg_indexes WHERE tablename = $1 AND indexdef ~ '\\mstatus\\M'",
        table,
    )
    return _index_names(plan[0]["Plan"]) & {row["indexname"] for row in rows}


def _index_names(node: Mapping[str, Any]) -> set[str]:
    """Return the indexes that a plan node and its children scan, bitmap scans included."""
    names = {node["Index Name"]} if "Index Name" in node else set()
    for child in node.get("Plans", []):
        names |= _index_names(child)
    return names


def rows_read(plan: Mapping[str, Any], table: str) -> int:
    """Return the rows that the scans of `table` in an EXPLAIN ANALYZE plan (FORMAT JSON,
    one node) read, filtered ones included."""
    read = 0
    if plan.get("Relation Name") == table:
        read += plan["Actual Rows"] * plan["Actual Loops"]
        read += plan.get("Rows Removed by Filter", 0)
        read += plan.get("Rows Removed by Index Recheck", 0)
    for child in plan.get("Plans", []):
        read += rows_read(child, table)
    return read


async def generic_plan(
    connection: asyncpg.Connection,
    statement: Any,
    insert_rows: Callable[[asyncpg.Connection], Awaitable[object]],
) -> dict[str, Any]:
    """Run a SQLAlchemy `statement` on the rows that `insert_rows` inserts, as a prepared
    statement on its generic plan, and return that plan with EXPLAIN ANALYZE's figures.

    The generic plan is the one Postgres may cache after five runs, made without the
    parameters. Everything runs in a transaction that is rolled back.
    """
    compiled = statement.compile(
        dialect=asyncpg_dialect.dialect(), compile_kwargs={"render_postcompile": True}
    )
    arguments = ", ".join(
        _parameter_literal(compiled.params[name]) for name in compiled.positiontup or ()
    )
    transaction = connection.transaction()
    await transaction.start()
    try:
        await insert_rows(connection)
        await connection.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await connection.execute(f"PREPARE generic_statement AS {compiled}")
        try:
            plan = await connection.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE generic_statement({arguments})"
            )
        finally:
            await connection.execute("DEALLOCATE generic_statement")
    finally:
        await transaction.rollback()
    return dict(json.loads(plan)[0]["Plan"])


def _parameter_literal(value: object) -> str:
    """Write a statement's parameter as SQL, for EXECUTE of a prepared statement."""
    if isinstance(value, timedelta):
        return f"interval '{value.total_seconds()} seconds'"
    if isinstance(value, int):
        return str(value)
    return "'" + str(getattr(value, "value", value)) + "'"


class PostgresProxy:
    """A TCP proxy to Postgres that can go down, for outage tests: clients connect
    through it, `cut()` aborts every open connection and rejects new ones until
    `restore()`, and `rejected` counts the connections rejected meanwhile."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self.down = False
        self.rejected = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self.down = True
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    def restore(self) -> None:
        self.down = False

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.down:
            self.rejected += 1
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            writer.transport.abort()
            return
        self._transports.update((writer.transport, upstream_writer.transport))
        await asyncio.gather(
            self._pipe(reader, upstream_writer),
            self._pipe(upstream_reader, writer),
            return_exceptions=True,
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            self._transports.discard(writer.transport)
            writer.transport.abort()
