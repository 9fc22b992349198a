"""`python -m bench.run`: measure the raw baselines, then the real stack, and write the table.

BENCH_MODE=quick (default, under 2 minutes) or full; BENCH_ONLY=api,webhooks,idle_hub
(any of them) measures only those figures and their baselines. Results go to bench/results/:
latest.json (figure → value, unit, baseline, ratio, target, meets_target),
latest-details.json (every raw measurement and the CPU of every process) and latest.md
(the table for docs/benchmarks.md). Process logs are in bench/results/logs/.
"""

import asyncio
import os
import platform
import resource
import signal
import sys
import time
import traceback
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import baselines, figures, hub_figures, webhook_figures
from bench.console import say
from bench.modes import Mode, current_mode
from bench.procs import (
    RESERVED_FILES,
    Proc,
    Processes,
    cpu_seconds,
    machine_busy_seconds,
)
from bench.results import Report
from bench.stack import (
    BenchData,
    cleanup,
    connection_slots_warning,
    prepare_database,
    start_stack,
)

RESULTS_DIR = Path(__file__).parent / "results"
# Connections per idle-client process at most; below the ~28,000 ephemeral ports of one
# source address, and one source address per process.
MAX_CONNECTIONS_PER_CLIENT_PROCESS = 25_000
# Open files wanted for 50,000 connections on one hub plus its Postgres and Redis ones.
WANTED_OPEN_FILES = 200_000
# Whole-run bounds, so that a stuck step cannot keep the run (and its load) going.
RUN_TIMEOUT_S = {"quick": 600.0, "full": 2400.0}


def raise_open_file_limit() -> dict[str, int]:
    """Raise the open-file limit for this process and the processes it starts.

    The soft limit goes up to the hard limit. A process with CAP_SYS_RESOURCE may raise
    the hard limit too (up to fs.nr_open), unless its sandbox forbids it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(hard, WANTED_OPEN_FILES)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "before_soft": soft,
        "before_hard": hard,
        "soft": new_soft,
        "hard": new_hard,
    }


def machine_description() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


class Run:
    def __init__(
        self, mode: Mode, data: BenchData, processes: Processes, open_files: int
    ) -> None:
        self.mode = mode
        # Connections one process can hold under the open-file limit.
        self.max_connections_per_process = open_files - RESERVED_FILES
        self.data = data
        self.processes = processes
        self.report = Report(mode.name)
        self.baselines: dict[str, Any] = {}
        self.measurements: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self._next_source_address = 2

    def take_source_addresses(self, count: int) -> list[str]:
        """Return `count` loopback addresses not used by an earlier client of this run."""
        first = self._next_source_address
        self._next_source_address += count
        if self._next_source_address > 255:
            raise RuntimeError("the run has used every source address 127.0.0.2-254")
        return [f"127.0.0.{number}" for number in range(first, first + count)]

    def cpu_snapshot(self) -> dict[str, float]:
        """Return CPU seconds so far of each process of the run, of this orchestrator
        (`orchestrator`) and of the whole machine (`machine`)."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        snapshot = {
            "machine": machine_busy_seconds(),
            "orchestrator": usage.ru_utime + usage.ru_stime,
        }
        for proc in self.processes.all:
            if proc.process.returncode is None:
                try:
                    snapshot[proc.name] = cpu_seconds(proc.pid)
                except (OSError, IndexError):
                    continue
        return snapshot

    @staticmethod
    def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Return CPU seconds used between two snapshots, and by everything else on the
        machine (`others`: other users' processes, Postgres, Redis, the kernel)."""
        used = {
            name: round(after[name] - before[name], 3)
            for name in after
            if name in before and after[name] - before[name] > 0.005
        }
        machine = used.pop("machine", 0.0)
        used["others"] = round(machine - sum(used.values()), 3)
        return used

    async def measure_tool(
        self, name: str, module: str, options: dict[str, Any], watched: list[Proc]
    ) -> dict[str, Any]:
        """Run a one-shot tool to its end and record the CPU of every running process."""
        before = self.cpu_snapshot()
        started = time.monotonic()
        tool = await self.processes.start_tool(name, module, options)
        try:
            result = await tool.next_result(timeout_s=600)
        finally:
            after = self.cpu_snapshot()
            await self.processes.stop(tool)
        result["wall_s"] = round(time.monotonic() - started, 3)
        used = self.cpu_used(before, after)
        # The tool started after the first snapshot; it reports its own CPU time.
        used[name] = float(result.get("cpu_s") or 0.0)
        used["others"] = round(used["others"] - used[name], 3)
        result["cpu_s_by_process"] = used
        self.measurements[name] = result
        return result

    async def hold_idle_connections(
        self,
        server: Proc,
        port: int,
        *,
        path: str,
        api_keys: list[str] | None,
        count: int,
        ping_interval_s: float,
        window_s: float,
        clients: list[Proc],
        name: str,
        settle_s: float = 2.0,
    ) -> dict[str, Any]:
        """Open `count` idle connections to `server`, then measure its memory and CPU.

        The client processes are appended to `clients`; the caller stops them.
        """
        rss_before = server.rss_bytes()
        per_process = min(
            MAX_CONNECTIONS_PER_CLIENT_PROCESS, self.max_connections_per_process
        )
        processes_needed = -(-count // per_process)
        for index in range(processes_needed):
            share = range(index * per_process, min(count, (index + 1) * per_process))
            options = {
                "host": "127.0.0.1",
                "port": port,
                "path": path,
                "count": len(share),
                "api_keys": [api_keys[i] for i in share] if api_keys else None,
                "local_addresses": self.take_source_addresses(1),
                "ping_interval_s": ping_interval_s,
                "connect_concurrency": 100,
            }
            clients.append(
                await self.processes.start_tool(
                    f"{name}-{index}", "ws_clients", options, interactive=True
                )
            )
        connect_started = time.monotonic()
        connected = await asyncio.gather(
            *(client.command("connect", timeout_s=900) for client in clients)
        )
        connect_s = time.monotonic() - connect_started
        await asyncio.sleep(settle_s)
        rss_after = server.rss_bytes()
        opened = sum(result["connected"] for result in connected)

        before = self.cpu_snapshot()
        pings_before = await self._client_pings(clients)
        await asyncio.sleep(window_s)
        after = self.cpu_snapshot()
        pings = await self._client_pings(clients) - pings_before
        server_cpu_s = after[server.name] - before[server.name]
        return {
            "connected": opened,
            "failed": sum(result["failed"] for result in connected),
            "connect_s": round(connect_s, 3),
            "connections_per_s": round(opened / connect_s, 1) if connect_s else None,
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "bytes_per_connection": (rss_after - rss_before) / opened
            if opened
            else None,
            "window_s": window_s,
            "pings_per_s": round(pings / window_s, 1),
            "server_cpu_percent": round(100 * server_cpu_s / window_s, 2),
            "server_cpu_us_per_ping": round(1e6 * server_cpu_s / pings, 1)
            if pings
            else None,
            "cpu_s_by_process": self.cpu_used(before, after),
        }

    @staticmethod
    async def _client_pings(clients: list[Proc]) -> int:
        statuses = await asyncio.gather(*(c.command("status") for c in clients))
        return sum(status["pings"] for status in statuses)


async def run_benchmark(mode: Mode) -> Path:
    started_at = datetime.now(UTC)
    started = time.monotonic()
    limits = raise_open_file_limit()
    data = BenchData()
    processes = Processes(RESULTS_DIR / "logs")
    run = Run(mode, data, processes, limits["soft"])
    say(f"bench: {mode.name} mode, open-file limit {limits['soft']}")
    if slots_warning := await connection_slots_warning():
        run.report.warnings.append(slots_warning)
        say(f"bench: warning: {slots_warning}")
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S[mode.name]):
            await _measure_everything(run)
    except TimeoutError:
        run.errors["run"] = f"stopped after {RUN_TIMEOUT_S[mode.name]:g} s"
        say(f"bench: {run.errors['run']}; writing what was measured")
    finally:
        await processes.stop_all()
        await cleanup(data)

    run.report.details = {
        "mode": mode.name,
        "started_at": started_at.isoformat(),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine_description(),
        "open_files": limits,
        "command": " ".join(sys.argv),
        "settings": mode.__dict__,
        "groups": sorted(selected_groups()),
        "baselines": run.baselines,
        "measurements": run.measurements,
        "errors": run.errors,
        "warnings": run.report.warnings,
    }
    path = run.report.write(RESULTS_DIR)
    print(run.report.markdown())
    print(
        f"bench: {mode.name} mode took {time.monotonic() - started:.0f} s; wrote {path}"
    )
    return path


async def _step(run: Run, name: str, step: Awaitable[None]) -> None:
    """Run one group of measurements; a failure is recorded and the run goes on."""
    try:
        await step
    except Exception as error:
        traceback.print_exc()
        run.errors[name] = repr(error)
        say(f"bench: {name} failed: {error!r}")


def selected_groups() -> set[str]:
    """Return the figure groups that BENCH_ONLY names (comma-separated), or all of them."""
    value = os.environ.get("BENCH_ONLY", "").strip()
    if not value:
        return set(FIGURE_GROUPS)
    groups = {name.strip() for name in value.split(",") if name.strip()}
    unknown = groups - set(FIGURE_GROUPS)
    if unknown:
        raise SystemExit(
            f"invalid BENCH_ONLY {value!r}; expected some of {', '.join(FIGURE_GROUPS)}"
        )
    return groups


# Figure groups, each with the raw baselines its figures are compared with.
FIGURE_GROUPS = {
    "api": ("storage", "bare_asgi", "bare_websocket"),
    "webhooks": ("webhook",),
    "idle_hub": ("bare_websocket",),
}


async def _measure_everything(run: Run) -> None:
    groups = selected_groups()
    needed = {baseline for group in groups for baseline in FIGURE_GROUPS[group]}
    await prepare_database(run.data)
    if "storage" in needed:
        await baselines.measure_storage(run)
    if "bare_asgi" in needed:
        await baselines.measure_bare_asgi(run)
    if "bare_websocket" in needed:
        await baselines.measure_bare_websocket(run)
    if "webhook" in needed:
        sink, sink_port = await webhook_figures.start_sink(run)
        await baselines.measure_webhook_baseline(run, sink_port, sink)

    say("stack: starting the services")
    stack = await start_stack(run.processes, run.data)
    if "api" in groups:
        await _step(run, "api", figures.measure_api(run, stack))
    # Neither the phones nor this hub are needed any more, and Postgres connections are
    # scarce (max_connections is shared with every other client of the server).
    await run.processes.stop(stack.hub)
    if "webhooks" in groups:
        await _step(
            run,
            "webhooks",
            webhook_figures.measure_webhooks(run, stack, sink, sink_port),
        )
    if "idle_hub" in groups:
        await _step(run, "idle_hub", hub_figures.measure_idle_hub(run, stack))


async def _run_until_signalled(mode: Mode) -> None:
    """Run the benchmark; SIGTERM or SIGINT cancels it, so its teardown still runs."""
    task = asyncio.create_task(run_benchmark(mode))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    await task


def main() -> None:
    asyncio.run(_run_until_signalled(current_mode()))


if __name__ == "__main__":
    main()
