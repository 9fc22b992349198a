"""Processes of one benchmark run: services, helper tools and bare servers.

Every process writes its output to a file under the run's log directory, runs in a
process group of its own, and is stopped (SIGTERM, then SIGKILL of its group) when the
run ends, whatever happened. CPU time and resident memory are read from /proc.
"""

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import httpx

from bench.toolmain import RESULT_PREFIX

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT_S = 15.0
HEALTH_TIMEOUT_S = 60.0
# File descriptors a process keeps for everything but its WebSocket connections: the
# interpreter, logs, Postgres and Redis pools.
RESERVED_FILES = 1_000


def cpu_seconds(pid: int) -> float:
    """Return user plus system CPU seconds of a process (not of its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of /proc/<pid>/stat; the split above starts at field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def machine_busy_seconds() -> float:
    """Return the CPU seconds all cores spent on anything but idle and I/O wait."""
    fields = [
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ]
    # user nice system idle iowait irq softirq steal (guest time is inside user).
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / CLOCK_TICKS_PER_S


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Proc:
    def __init__(
        self, name: str, process: asyncio.subprocess.Process, log: IO[bytes]
    ) -> None:
        self.name = name
        self.process = process
        self.log = log
        self.results: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        if process.stdout is not None:
            self._reader = asyncio.create_task(self._read_stdout())

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.log.write(line)
            self.log.flush()
            text = line.decode(errors="replace")
            if text.startswith(RESULT_PREFIX):
                self.results.put_nowait(json.loads(text[len(RESULT_PREFIX) :]))

    async def command(
        self, name: str, timeout_s: float = 600.0, **options: Any
    ) -> dict[str, Any]:
        """Send one command to a command tool and return its reply."""
        assert self.process.stdin is not None
        self.process.stdin.write(
            json.dumps({"command": name, **options}).encode() + b"\n"
        )
        await self.process.stdin.drain()
        return await self.next_result(timeout_s)

    async def next_result(self, timeout_s: float) -> dict[str, Any]:
        getter = asyncio.ensure_future(self.results.get())
        exited = asyncio.ensure_future(self.process.wait())
        done, _ = await asyncio.wait(
            {getter, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        exited.cancel()
        if getter in done:
            reply = getter.result()
            if "error" in reply:
                raise RuntimeError(f"{self.name}: {reply['error']}")
            return reply
        getter.cancel()
        if self._reader is not None and not done:
            raise TimeoutError(f"{self.name} gave no result within {timeout_s} s")
        # The process exited: its last line may still be in the pipe.
        if self._reader is not None:
            await self._reader
        if not self.results.empty():
            return self.results.get_nowait()
        raise RuntimeError(
            f"{self.name} exited with code {self.process.returncode}; see {self.log.name}"
        )

    async def stop(self) -> None:
        """Stop with SIGTERM, then kill the process group after a timeout."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader
        self.log.close()

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


class Processes:
    """Every process of a run, so that teardown stops them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.all: list[Proc] = []
        self.bin_dir = Path(sys.executable).parent

    async def _start(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str] | None,
        interactive: bool,
        read_results: bool,
    ) -> Proc:
        log = (self.log_dir / f"{name}.log").open("wb")
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env) if env is not None else None,
            stdin=asyncio.subprocess.PIPE
            if interactive
            else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if read_results else log,
            stderr=log,
            start_new_session=True,
            limit=16 * 1024 * 1024,
        )
        proc = Proc(name, process, log)
        self.all.append(proc)
        return proc

    async def start_service(
        self, name: str, script: str, env: Mapping[str, str]
    ) -> Proc:
        return await self._start(
            name,
            [str(self.bin_dir / script)],
            env,
            interactive=False,
            read_results=False,
        )

    async def start_tool(
        self,
        name: str,
        module: str,
        options: dict[str, Any],
        *,
        interactive: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        # Options go through a file: 19,000 device keys exceed the kernel's limit on
        # one command-line argument (MAX_ARG_STRLEN, 128 KiB).
        options_path = self.log_dir / f"{name}.options.json"
        options_path.write_text(json.dumps(options))
        argv = [sys.executable, "-m", f"bench.tools.{module}", str(options_path)]
        return await self._start(name, argv, env, interactive, read_results=True)

    async def stop(self, proc: Proc) -> None:
        await proc.stop()
        if proc in self.all:
            self.all.remove(proc)

    async def stop_all(self) -> None:
        procs, self.all = list(reversed(self.all)), []
        await asyncio.gather(*(proc.stop() for proc in procs), return_exceptions=True)


async def wait_healthy(
    url: str, proc: Proc, timeout_s: float = HEALTH_TIMEOUT_S
) -> None:
    """Wait until `url` returns 200; raise if the process exits or time runs out."""
    async with httpx.AsyncClient(timeout=2.0) as client:
        async with asyncio.timeout(timeout_s):
            while True:
                if proc.process.returncode is not None:
                    raise RuntimeError(
                        f"{proc.name} exited with code {proc.process.returncode}; "
                        f"see {proc.log.name}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get(url)
                    if response.status_code == 200:
                        return
                await asyncio.sleep(0.1)
