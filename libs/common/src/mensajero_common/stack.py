"""The local stack behind `make run`: Postgres, Redis, migrations and the four services.

Run it as `python -m mensajero_common.stack`. It uses the Postgres at DATABASE_URL and the
Redis at REDIS_URL when they respond. When one does not respond and its URL names this
machine, it starts a real server from the local binaries, with its data under
MENSAJERO_RUN_DIR (default `.run/`). Then it applies the migrations, starts the API, the
device-hub, the dispatcher and the webhook-sender with their output prefixed by name, and
waits until the API and the device-hub return 200 on GET /healthz.

Ctrl-C or SIGTERM stops everything it started, the services first, and exits 0. When a
process it started exits by itself, it stops the others and exits 1.

When SECRET_KEY is still the default, the services sign their tokens with a random key
made on the first run and stored in MENSAJERO_RUN_DIR, so tokens outlive a restart.
"""

import asyncio
import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.engine import make_url

from mensajero_common.settings import DEFAULT_SECRET, Settings, get_settings

# (name in the output, console script)
SERVICES = (
    ("api", "mensajero-api"),
    ("hub", "mensajero-hub"),
    ("dispatcher", "mensajero-dispatcher"),
    ("webhooks", "mensajero-webhooks"),
)
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# Directories of the Postgres server binaries in the Debian and Ubuntu packages
# (postgresql-NN), in source builds and in Homebrew.
POSTGRES_BIN_PATTERNS = (
    "/usr/lib/postgresql/*/bin",
    "/usr/local/pgsql/bin",
    "/opt/homebrew/opt/postgresql@*/bin",
)
REDIS_BIN_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin")

NAME_WIDTH = 10
SERVER_START_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
# The webhook-sender's margin on SIGTERM beyond WEBHOOK_TIMEOUT_S, for each of its two
# waits (SHUTDOWN_GRACE_MARGIN_S in mensajero_webhooks.main).
WEBHOOK_STOP_MARGIN_S = 5.0
CHECK_INTERVAL_S = 0.2
# A service that exits after running this long is started again, after RESTART_DELAY_S.
# One that exits sooner, from its start or its last restart, is failing on its own (a
# setting, a port, a bug), so the whole stack stops and shows its output.
RESTART_MIN_UPTIME_S = 10.0
RESTART_DELAY_S = 1.0
OUTPUT_CHUNK_BYTES = 65536
# Under MENSAJERO_RUN_DIR: the key that signs the local stack's tokens when SECRET_KEY is
# the default.
SECRET_KEY_FILE = "secret_key"

T = TypeVar("T")


class StackError(Exception):
    """A problem the user has to fix, with a message that names it and the fix."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while the stack was starting."""


def say(message: str) -> None:
    print(f"{'stack':<{NAME_WIDTH}} | {message}", flush=True)


def _write_line(prefix: str, line: bytes) -> None:
    sys.stdout.write(prefix + line.decode(errors="replace").rstrip("\r") + "\n")
    sys.stdout.flush()


async def _copy_output(name: str, stream: asyncio.StreamReader) -> None:
    """Copy a child's output to ours line by line, each line prefixed by `name`."""
    prefix = f"{name:<{NAME_WIDTH}} | "
    partial = b""
    # Chunks rather than readline(), which fails on lines over the reader's limit (a
    # JSON log record with a long traceback can be one).
    while chunk := await stream.read(OUTPUT_CHUNK_BYTES):
        *lines, partial = (partial + chunk).split(b"\n")
        for line in lines:
            _write_line(prefix, line)
    if partial:
        _write_line(prefix, partial)


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    output: asyncio.Task[None]
    stop_signal: signal.Signals = signal.SIGTERM
    # The event loop's time when the process started.
    started_at: float = field(default_factory=lambda: asyncio.get_running_loop().time())

    @property
    def exited(self) -> bool:
        return self.process.returncode is not None

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Send the stop signal, wait up to `timeout_s`, then kill."""
        if not self.exited:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(self.stop_signal)
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except TimeoutError:
                say(f"{self.name} did not stop within {timeout_s:.0f} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        await self.output


async def start_child(
    name: str,
    argv: Sequence[str | Path],
    *,
    user: pwd.struct_passwd | None = None,
    stop_signal: signal.Signals = signal.SIGTERM,
    stdin: bytes | None = None,
) -> Child:
    """Start a process in a session of its own, so that a Ctrl-C in the terminal reaches
    only this runner, which then stops the children in order."""
    credentials: dict[str, Any] = {}
    if user is not None:
        credentials = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    process = await asyncio.create_subprocess_exec(
        *(str(arg) for arg in argv),
        stdin=asyncio.subprocess.PIPE
        if stdin is not None
        else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        **credentials,
    )
    if stdin is not None:
        assert process.stdin is not None
        try:
            process.stdin.write(stdin)
            await process.stdin.drain()
        except BaseException:
            # Interrupted before the caller could track the process, so end it here.
            process.kill()
            raise
        process.stdin.close()
    assert process.stdout is not None
    output = asyncio.create_task(_copy_output(name, process.stdout))
    say(f"started {name} (pid {process.pid})")
    return Child(name, process, output, stop_signal)


async def run_to_completion(
    name: str, argv: Sequence[str | Path], *, user: pwd.struct_passwd | None = None
) -> None:
    """Run a command to its end, or raise StackError when it fails."""
    child = await start_child(name, argv, user=user)
    try:
        returncode = await child.process.wait()
        await child.output
    finally:
        # Reached early only when the start is interrupted.
        await child.stop()
    if returncode != 0:
        raise StackError(
            f"{name} failed with exit code {returncode}, see its output above"
        )


async def wait_until_responds(
    child: Child, responds: Callable[[], Awaitable[bool]], timeout_s: float
) -> None:
    """Poll `responds` until it returns True, and raise StackError if `child` exits or
    the time runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await responds():
        if child.exited:
            raise StackError(
                f"{child.name} exited with code {child.process.returncode} before it "
                "accepted connections, see its output above"
            )
        if loop.time() > deadline:
            raise StackError(
                f"{child.name} did not accept connections within {timeout_s:.0f} s"
            )
        await asyncio.sleep(CHECK_INTERVAL_S)


# Postgres


@dataclass(frozen=True)
class PostgresTarget:
    host: str
    port: int
    user: str

    @classmethod
    def from_url(cls, database_url: str) -> "PostgresTarget":
        url = make_url(database_url)
        return cls(
            url.host or "127.0.0.1", url.port or 5432, url.username or "postgres"
        )


async def postgres_responds(database_url: str) -> bool:
    """Tell whether a Postgres server responds at the URL's host and port.

    A server that responds with an error, such as a wrong password, counts as responding,
    and the migrations then report that error.
    """
    url = make_url(database_url).set(drivername="postgresql", database="postgres")
    try:
        connection = await asyncpg.connect(
            url.render_as_string(hide_password=False), timeout=2
        )
    except (OSError, TimeoutError, asyncpg.CannotConnectNowError):
        return False
    except asyncpg.PostgresError:
        return True
    await connection.close()
    return True


def _version_of(path: str) -> tuple[int, ...]:
    return tuple(int(number) for number in re.findall(r"\d+", path))


def find_postgres_bin_dir() -> Path | None:
    """Return a directory with both `postgres` and `initdb`, newest version first."""
    candidates: list[Path] = []
    for pattern in POSTGRES_BIN_PATTERNS:
        matches = sorted(glob.glob(pattern), key=_version_of, reverse=True)
        candidates += [Path(match) for match in matches]
    on_path = shutil.which("postgres")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)

    for directory in candidates:
        if (directory / "postgres").is_file() and (directory / "initdb").is_file():
            return directory
    return None


def _postgres_user() -> pwd.struct_passwd | None:
    """Return the user to run Postgres as: None for the current one.

    Postgres refuses to run as root, so under root it runs as the `postgres` system user
    that the distribution packages create.
    """
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "Postgres refuses to run as root, and no 'postgres' user exists to run it "
            "as. Run `make run` as a normal user, or create a 'postgres' system user"
        ) from None


def _chown_tree(root: Path, user: pwd.struct_passwd) -> None:
    for directory, _, files in os.walk(root):
        os.chown(directory, user.pw_uid, user.pw_gid)
        for name in files:
            os.chown(Path(directory) / name, user.pw_uid, user.pw_gid)


async def start_postgres(settings: Settings, run_dir: Path) -> Child:
    """Start a Postgres server at DATABASE_URL's port, without waiting for it to respond.

    The data directory under `run_dir` is initialized the first time. Authentication is
    `trust`, which is fit for local use only.
    """
    target = PostgresTarget.from_url(settings.DATABASE_URL)
    bin_dir = find_postgres_bin_dir()
    if bin_dir is None:
        raise StackError(
            f"Postgres does not respond at {target.host}:{target.port}, and no postgres "
            "binary was found to start one. Install PostgreSQL (Debian or Ubuntu: "
            "`sudo apt-get install postgresql`; macOS: `brew install postgresql`), or set "
            "DATABASE_URL to a running server"
        )

    user = _postgres_user()
    data_dir = (run_dir / "postgres").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        _chown_tree(data_dir, user)
    if not (data_dir / "PG_VERSION").exists():
        say(f"initializing a Postgres data directory in {data_dir}")
        await run_to_completion(
            "initdb",
            [
                bin_dir / "initdb",
                "--pgdata",
                data_dir,
                "--username",
                target.user,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
            ],
            user=user,
        )

    say(f"starting Postgres on {target.host}:{target.port}")
    return await start_child(
        "postgres",
        # An empty -k turns off the Unix socket, so no socket directory must exist.
        [
            bin_dir / "postgres",
            "-D",
            data_dir,
            "-h",
            target.host,
            "-p",
            str(target.port),
            "-k",
            "",
        ],
        user=user,
        # SIGINT is Postgres's "fast" shutdown: it ends open sessions instead of
        # waiting for them.
        stop_signal=signal.SIGINT,
    )


# Redis


@dataclass(frozen=True)
class RedisTarget:
    host: str
    port: int
    password: str | None

    @classmethod
    def from_url(cls, redis_url: str) -> "RedisTarget":
        parts = urlsplit(redis_url)
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname or "127.0.0.1", parts.port or 6379, password)


async def redis_responds(redis_url: str) -> bool:
    """Tell whether a Redis server responds at the URL, with an authentication error too."""
    client: Redis = Redis.from_url(
        redis_url, socket_connect_timeout=2, socket_timeout=2
    )
    try:
        await client.ping()
    except (AuthenticationError, ResponseError):
        return True
    except (RedisConnectionError, RedisTimeoutError, OSError):
        return False
    finally:
        await client.aclose()
    return True


async def redis_rejection(redis_url: str) -> str | None:
    """Return why the Redis at the URL rejects this client, such as a wrong password or a
    database index out of range, or None when it accepts it."""
    client: Redis = Redis.from_url(
        redis_url, socket_connect_timeout=2, socket_timeout=2
    )
    try:
        await client.ping()
    except (AuthenticationError, ResponseError) as error:
        return str(error)
    finally:
        await client.aclose()
    return None


def find_redis_server() -> Path | None:
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return Path(on_path)
    for directory in REDIS_BIN_DIRS:
        candidate = Path(directory) / "redis-server"
        if candidate.is_file():
            return candidate
    return None


async def start_redis(settings: Settings, run_dir: Path) -> Child:
    """Start a Redis server at REDIS_URL's port, without waiting for it to respond.

    Its snapshots go under `run_dir`.
    """
    target = RedisTarget.from_url(settings.REDIS_URL)
    binary = find_redis_server()
    if binary is None:
        raise StackError(
            f"Redis does not respond at {target.host}:{target.port}, and no redis-server "
            "binary was found to start one. Install Redis (Debian or Ubuntu: `sudo "
            "apt-get install redis-server`; macOS: `brew install redis`), or set REDIS_URL "
            "to a running server"
        )

    data_dir = (run_dir / "redis").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    bind = "127.0.0.1" if target.host == "localhost" else target.host
    config = [
        f"port {target.port}",
        f"bind {bind}",
        f'dir "{data_dir}"',
        "daemonize no",
        "appendonly no",
    ]
    if target.password:
        config.append(f'requirepass "{target.password}"')

    say(f"starting Redis on {target.host}:{target.port}")
    # The configuration goes through stdin ("redis-server -"), so that a password never
    # shows in the process list.
    return await start_child(
        "redis", [binary, "-"], stdin=("\n".join(config) + "\n").encode()
    )


# Services


def find_script(script: str) -> Path:
    """Find a console script next to this Python first, so the workspace's one wins."""
    beside = Path(sys.executable).parent / script
    if beside.is_file():
        return beside
    on_path = shutil.which(script)
    if on_path is not None:
        return Path(on_path)
    raise StackError(f"{script} is not installed; run `make install` (uv sync) first")


def _probe_host(host: str) -> str:
    """Return the address to reach a server that listens on `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


async def healthz_ok(host: str, port: int) -> bool:
    """Tell whether GET /healthz at host:port returns 200."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(_probe_host(host), port), 2
        )
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(
            f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 2)
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return status_line.split(b" ")[1:2] == [b"200"]


def _url_host(host: str) -> str:
    host = _probe_host(host)
    return f"[{host}]" if ":" in host else host


# The stack


@dataclass
class Stack:
    settings: Settings
    run_dir: Path
    servers: list[Child] = field(default_factory=list)
    services: list[Child] = field(default_factory=list)

    @property
    def children(self) -> list[Child]:
        return self.servers + self.services

    async def start(self) -> None:
        """Start the servers that do not respond, migrate, start the services and wait
        until the HTTP ones are healthy."""
        settings = self.settings
        if await postgres_responds(settings.DATABASE_URL):
            say("using the Postgres at DATABASE_URL")
        else:
            host = PostgresTarget.from_url(settings.DATABASE_URL).host
            self._require_local("Postgres", host)
            postgres = await start_postgres(settings, self.run_dir)
            self.servers.append(postgres)
            await wait_until_responds(
                postgres,
                lambda: postgres_responds(settings.DATABASE_URL),
                SERVER_START_TIMEOUT_S,
            )

        if await redis_responds(settings.REDIS_URL):
            say("using the Redis at REDIS_URL")
        else:
            self._require_local("Redis", RedisTarget.from_url(settings.REDIS_URL).host)
            redis = await start_redis(settings, self.run_dir)
            self.servers.append(redis)
            await wait_until_responds(
                redis,
                lambda: redis_responds(settings.REDIS_URL),
                SERVER_START_TIMEOUT_S,
            )
        rejection = await redis_rejection(settings.REDIS_URL)
        if rejection is not None:
            raise StackError(
                f"the Redis at REDIS_URL rejects the connection: {rejection}. Check the "
                "password and the database index at the end of REDIS_URL (0 to 15 on a "
                "default Redis server)"
            )

        self._require_free_ports()
        await run_to_completion(
            "migrate", [sys.executable, "-m", "mensajero_common.migrate"]
        )
        for name, script in SERVICES:
            self.services.append(await start_child(name, [find_script(script)]))
        await self._wait_until_healthy()

    def _require_free_ports(self) -> None:
        """Stop before starting anything when a service's port is taken.

        Otherwise the health check could reach whatever else listens there and report
        the stack as running while the new service fails to bind.
        """
        settings = self.settings
        wanted = [
            ("API_PORT", settings.API_HOST, settings.API_PORT),
            ("HUB_PORT", settings.HUB_HOST, settings.HUB_PORT),
            ("DISPATCHER_OPS_PORT", settings.OPS_HOST, settings.DISPATCHER_OPS_PORT),
            ("WEBHOOKS_OPS_PORT", settings.OPS_HOST, settings.WEBHOOKS_OPS_PORT),
        ]
        for name, host, port in wanted:
            if port == 0:
                continue
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, port))
                except OSError:
                    raise StackError(
                        f"port {port} on {host} is already in use ({name}); stop what "
                        f"listens there or set {name} to another port"
                    ) from None

    def _require_local(self, server: str, host: str) -> None:
        if host not in LOCAL_HOSTS:
            raise StackError(
                f"{server} does not respond at {host}, which is not this machine, so it "
                "cannot be started here; start it there or fix its URL"
            )

    async def _wait_until_healthy(self) -> None:
        settings = self.settings
        endpoints = [
            ("api", settings.API_HOST, settings.API_PORT),
            ("hub", settings.HUB_HOST, settings.HUB_PORT),
        ]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HEALTH_TIMEOUT_S
        while endpoints:
            self._raise_if_any_exited()
            if loop.time() > deadline:
                names = ", ".join(name for name, _, _ in endpoints)
                raise StackError(
                    f"{names} did not return 200 on /healthz within "
                    f"{HEALTH_TIMEOUT_S:.0f} s"
                )
            healthy = [await healthz_ok(host, port) for _, host, port in endpoints]
            endpoints = [
                endpoint
                for endpoint, ok in zip(endpoints, healthy, strict=True)
                if not ok
            ]
            if endpoints:
                await asyncio.sleep(CHECK_INTERVAL_S)

    def _raise_if_any_exited(self) -> None:
        for child in self.children:
            if child.exited:
                raise StackError(
                    f"{child.name} exited with code {child.process.returncode} while "
                    "the stack was starting, see its output above"
                )

    def print_urls(self) -> None:
        settings = self.settings
        api = f"http://{_url_host(settings.API_HOST)}:{settings.API_PORT}"
        hub = f"ws://{_url_host(settings.HUB_HOST)}:{settings.HUB_PORT}"
        say("Mensajero is running:")
        say(f"  API         {api}  (OpenAPI docs at {api}/docs)")
        say(f"  device-hub  {hub}/api/v1/android/ws")
        say("Press Ctrl-C to stop.")

    async def wait_for_exit(self) -> Child:
        """Return the first child that exits."""
        waits = {
            asyncio.ensure_future(child.process.wait()): child
            for child in self.children
        }
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return waits[next(iter(done))]

    async def restart(self, child: Child) -> Child:
        """Start an exited service again, in its place among the services."""
        await child.output
        script = dict(SERVICES)[child.name]
        restarted = await start_child(child.name, [find_script(script)])
        self.services[self.services.index(child)] = restarted
        return restarted

    async def stop(self) -> None:
        """Stop the services, then the servers they use."""
        timeouts = (service_stop_timeout_s(self.settings), STOP_TIMEOUT_S)
        for group, timeout_s in zip(
            (self.services, self.servers), timeouts, strict=True
        ):
            running = [child for child in group if not child.exited]
            if running:
                say("stopping " + ", ".join(child.name for child in running))
            await asyncio.gather(*(child.stop(timeout_s) for child in group))


def service_stop_timeout_s(settings: Settings) -> float:
    """Return how long a service may take to stop before it is killed.

    On SIGTERM the webhook-sender lets its POSTs in flight end: arq waits up to
    WEBHOOK_TIMEOUT_S plus a margin for its jobs, then the drain tasks get as long again.
    A kill cuts those attempts off, and each is sent again once its lease runs out.
    """
    sender_s = 2 * (settings.WEBHOOK_TIMEOUT_S + WEBHOOK_STOP_MARGIN_S)
    return sender_s + STOP_TIMEOUT_S


async def _unless_stopped(stop: asyncio.Event, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, or cancel it and raise Interrupted if `stop` is set first."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise Interrupted


async def run_stack(settings: Settings, run_dir: Path) -> int:
    """Run the stack until Ctrl-C, SIGTERM or the exit of a child, and return the exit
    code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    stack = Stack(settings, run_dir)
    try:
        await _unless_stopped(stop, stack.start())
        stack.print_urls()
        while True:
            exited = await _unless_stopped(stop, stack.wait_for_exit())
            uptime_s = loop.time() - exited.started_at
            code = exited.process.returncode
            if exited not in stack.services or uptime_s < RESTART_MIN_UPTIME_S:
                say(
                    f"{exited.name} exited with code {code} after {uptime_s:.0f} s, "
                    "so the whole stack stops; see its output above"
                )
                return 1
            say(
                f"{exited.name} exited with code {code} after {uptime_s:.0f} s; "
                f"starting it again in {RESTART_DELAY_S:.0f} s"
            )
            await _unless_stopped(stop, asyncio.sleep(RESTART_DELAY_S))
            await stack.restart(exited)
    except Interrupted:
        return 0
    except StackError as error:
        say(f"error: {error}")
        return 1
    finally:
        await stack.stop()


def local_secret_key(run_dir: Path) -> str:
    """Return the secret key stored in `run_dir`, or make one and store it there.

    A file it creates is readable by its owner only, and an existing file keeps its mode.
    """
    path = run_dir / SECRET_KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        stored_key = path.read_text().strip()
        if stored_key:
            return stored_key
    run_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    return key


def use_local_secret_key(settings: Settings, run_dir: Path) -> Settings:
    """Replace a default SECRET_KEY with the one stored in `run_dir`, for this process and
    for the services it starts, which inherit its environment.

    The default is too short for HS256 (PyJWT warns about it), and production settings
    reject it anyway.
    """
    if settings.SECRET_KEY != DEFAULT_SECRET:
        return settings
    key = local_secret_key(run_dir)
    os.environ["SECRET_KEY"] = key
    say(f"SECRET_KEY is the default, so the services use the key in {run_dir}")
    return settings.model_copy(update={"SECRET_KEY": key})


def main() -> None:
    run_dir = Path(os.environ.get("MENSAJERO_RUN_DIR", ".run"))
    settings = use_local_secret_key(get_settings(), run_dir)
    sys.exit(asyncio.run(run_stack(settings, run_dir)))


if __name__ == "__main__":
    main()
