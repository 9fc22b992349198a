"""Service processes for the cross-service tests: start, read, stop, show their output.

Each process writes its output to a file in a directory of the test. The tail of every
file is printed at teardown, so a failing test shows what each service logged.
"""

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from mensajero_common.settings import Settings
from mensajero_common.testing import scaled

SERVICES = (
    ("api", "mensajero-api"),
    ("hub", "mensajero-hub"),
    ("dispatcher", "mensajero-dispatcher"),
    ("webhooks", "mensajero-webhooks"),
)
STOP_TIMEOUT_S = 10.0
OUTPUT_TAIL_LINES = 40


def service_environment(settings: Settings, **overrides: object) -> dict[str, str]:
    """Return the environment of a service process that uses the test's database and
    Redis key prefix."""
    names = (
        "ENVIRONMENT",
        "DATABASE_URL",
        "REDIS_URL",
        "REDIS_KEY_PREFIX",
        "SECRET_KEY",
        "FIRST_SUPERUSER",
        "FIRST_SUPERUSER_PASSWORD",
        "DATABASE_POOL_SIZE",
        "DATABASE_MAX_OVERFLOW",
        "DISPATCHER_OPS_PORT",
        "WEBHOOKS_OPS_PORT",
    )
    variables = {name: str(getattr(settings, name)) for name in names}
    variables.update({"LOG_JSON": "true", "LOG_LEVEL": "INFO"})
    variables.update({name: str(value) for name, value in overrides.items()})
    return {**os.environ, **variables}


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    log_file: IO[bytes]
    # (loop time of arrival, line) of each stdout line, when stdout is read by the test.
    lines: list[tuple[float, bytes]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None


class ProcessGroup:
    """Child processes of one test, each stopped at teardown whatever the outcome."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    async def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        read_stdout: bool = False,
    ) -> Child:
        """Start a process with its output in `<name>.log`.

        With `read_stdout`, the stdout lines are also collected in `Child.lines`.
        """
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if read_stdout else log_file,
            stderr=log_file,
            # A group of its own, so teardown can kill anything it spawned too.
            start_new_session=True,
        )
        child = Child(name, process, log_path, log_file)
        self.children.append(child)
        if read_stdout:
            child.reader = asyncio.create_task(self._collect(child))
        return child

    @staticmethod
    async def _collect(child: Child) -> None:
        assert child.process.stdout is not None
        loop = asyncio.get_running_loop()
        while line := await child.process.stdout.readline():
            child.lines.append((loop.time(), line))
            child.log_file.write(line)
            child.log_file.flush()

    async def stop(self, child: Child) -> None:
        """Stop with SIGTERM, then kill its whole process group after a timeout."""
        if child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), scaled(STOP_TIMEOUT_S))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                await child.process.wait()
        if child.reader is not None:
            await child.reader
        child.log_file.close()

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(child) for child in reversed(self.children)))

    def print_output_tails(self) -> None:
        for child in self.children:
            lines = child.log_path.read_bytes().decode(errors="replace").splitlines()
            print(f"----- {child.name} (exit code {child.process.returncode}) -----")
            for line in lines[-OUTPUT_TAIL_LINES:]:
                print(line[:2000])


async def wait_for_healthz(client: httpx.AsyncClient, url: str, child: Child) -> None:
    async with asyncio.timeout(scaled(30)):
        while True:
            assert child.process.returncode is None, f"{child.name} exited"
            with contextlib.suppress(httpx.TransportError):
                response = await client.get(f"{url}/healthz")
                if response.status_code == 200:
                    return
            await asyncio.sleep(0.1)


@dataclass
class RunningServices:
    api_url: str
    hub_ws_url: str
    env: dict[str, str]
    processes: ProcessGroup
    children: dict[str, Child]
