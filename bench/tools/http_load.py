"""HTTP load generator process: closed loop, open loop or a fixed count of POSTs."""

from typing import Any

from bench import load
from bench.toolmain import run_tool


async def main(options: dict[str, Any]) -> dict[str, Any]:
    target = load.Target(
        host=options["host"],
        port=options["port"],
        path=options["path"],
        body_template=options["body_template"],
        headers=options.get("headers") or [{}],
        local_addresses=options.get("local_addresses"),
    )
    mode = options["mode"]
    counter_start = options.get("counter_start", 0)
    if mode == "closed":
        result = await load.closed_loop(
            target,
            options["concurrency"],
            options["warmup_s"],
            options["duration_s"],
            counter_start,
        )
    elif mode == "open":
        result = await load.open_loop(
            target,
            options["rate_per_s"],
            options["warmup_s"],
            options["duration_s"],
            options["concurrency"],
            counter_start=counter_start,
        )
    elif mode == "count":
        result = await load.fixed_count(
            target, options["concurrency"], options["total"], counter_start
        )
    else:
        raise ValueError(f"unknown mode {mode!r}; expected closed, open or count")
    return {"mode": mode, **result.summary()}


if __name__ == "__main__":
    run_tool(main)
