"""Idle-connection figures: connections held by one device-hub process, memory per
connection against the bare WebSocket server, and the CPU that heartbeats cost.

A second device-hub process, started for this alone, keeps the idle phones, so its
memory grows from an empty hub. Its WEBSOCKET_PING_INTERVAL is the mode's ping interval;
the phones learn it from the register ack and ping on it, as real phones do.
"""

from typing import TYPE_CHECKING

import httpx

from bench.console import say
from bench.modes import FULL_SCALE_PINGS_PER_S
from bench.procs import RESERVED_FILES, Proc
from bench.results import Figure
from bench.stack import Stack, create_users, insert_devices, start_extra_hub

if TYPE_CHECKING:
    from bench.run import Run

KIB = 1024


async def measure_idle_hub(run: "Run", stack: Stack) -> None:
    mode = run.mode
    # A process cannot hold more sockets than its open-file limit allows.
    count = min(mode.idle_connections, run.max_connections_per_process)
    say(f"figure: {count} idle connections on one hub")
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as client:
        (owner,) = await create_users(client, run.data.dsn, "fleet", 1)
    keys = await insert_devices(run.data.dsn, [owner.user_id], count, "idle phone")
    interval_s = mode.ping_interval_s(count)
    hub, port = await start_extra_hub(
        run.processes, run.data, "hub-idle", WEBSOCKET_PING_INTERVAL=interval_s
    )
    clients: list[Proc] = []
    try:
        held = await run.hold_idle_connections(
            hub,
            port,
            path="/api/v1/android/ws",
            api_keys=keys[owner.user_id],
            count=count,
            ping_interval_s=interval_s,
            window_s=mode.heartbeat_window_s,
            clients=clients,
            name="idle-clients",
            # A connection writes its heartbeat on connect, then on every second ping.
            # After one full interval, the connect's write is behind every connection,
            # and each ping is a steady-state ping.
            settle_s=interval_s,
        )
    finally:
        for client in clients:
            await client.command("stop", timeout_s=120)
            await run.processes.stop(client)
        await run.processes.stop(hub)
    held["attempted"] = count
    run.measurements["idle_hub"] = held
    _add_figures(run, held)


def _add_figures(run: "Run", held: dict[str, object]) -> None:
    mode = run.mode
    bare = run.baselines["bare_websocket"]
    connected = int(held["connected"])  # type: ignore[call-overload]
    attempted = int(held["attempted"])  # type: ignore[call-overload]
    if attempted < mode.idle_connections:
        count_note = (
            f"capped at {attempted:,} by the open-file limit of "
            f"{run.max_connections_per_process + RESERVED_FILES:,} per process"
        )
    elif mode.name == "quick":
        count_note = f"quick mode opens {attempted:,}; the full mode opens 50,000"
    else:
        count_note = ""
    run.report.add(
        Figure(
            "idle_connections_per_hub",
            "idle WebSocket connections held by one device-hub",
            connected,
            "connections",
            "value>=",
            50_000.0 if mode.name == "full" else float(mode.idle_connections),
            note=" ".join(
                part
                for part in (
                    count_note,
                    f"opened at {held['connections_per_s']} connections/s",
                    f"({held['failed']} failed)" if held["failed"] else "",
                )
                if part
            ),
        )
    )
    run.report.add(
        Figure(
            "idle_memory_per_connection",
            "memory per idle connection",
            float(held["bytes_per_connection"]) / KIB,  # type: ignore[arg-type]
            "KiB",
            "ratio<=",
            1.5,
            baseline=float(bare["bytes_per_connection"]) / KIB,
            baseline_title=f"bare server at {bare['connected']:,} connections",
        )
    )
    # Both servers' CPU per ping, at the ping rate of 50,000 phones on the default
    # 60 s interval; each mode pings at about that rate already, so the scaling is small.
    run.report.add(
        Figure(
            "idle_heartbeat_cpu",
            "heartbeat CPU of the hub at 833 pings/s, % of one core",
            _percent_at_full_scale(held["server_cpu_us_per_ping"]),
            "%",
            "value<=",
            10.0,
            baseline=_percent_at_full_scale(bare.get("server_cpu_us_per_ping")),
            baseline_title="bare server",
            note=(
                f"measured {held['server_cpu_percent']} % at {held['pings_per_s']} "
                f"pings/s over {held['window_s']:g} s"
            ),
        )
    )


def _percent_at_full_scale(cpu_us_per_ping: object) -> float | None:
    if cpu_us_per_ping is None:
        return None
    return float(cpu_us_per_ping) * FULL_SCALE_PINGS_PER_S / 1e4  # type: ignore[arg-type]
