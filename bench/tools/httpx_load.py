"""The webhook baseline: httpx POSTs to the sink at the webhook-sender's concurrency.

Same client library, connection limit, body and headers as the webhook-sender's
deliveries, and nothing else: no database, no queue.
"""

import asyncio
import time
from typing import Any

import httpx

from bench.stats import summarize_ms
from bench.toolmain import run_tool


async def main(options: dict[str, Any]) -> dict[str, Any]:
    concurrency = options["concurrency"]
    body = options["body"].encode()
    headers = options["headers"]
    latencies_ms: list[float] = []
    failures = 0
    async with httpx.AsyncClient(
        limits=httpx.Limits(max_connections=concurrency),
        headers={"User-Agent": "Mensajero-Webhooks/0.1"},
        timeout=options.get("timeout_s", 10.0),
    ) as client:
        start = time.monotonic()
        measure_from = start + options["warmup_s"]
        stop_at = measure_from + options["duration_s"]

        async def worker() -> None:
            nonlocal failures
            while (started := time.monotonic()) < stop_at:
                try:
                    response = await client.post(
                        options["url"], content=body, headers=headers
                    )
                    ok = response.status_code < 300
                except httpx.HTTPError:
                    ok = False
                if started < measure_from:
                    continue
                if ok:
                    latencies_ms.append((time.monotonic() - started) * 1000)
                else:
                    failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration_s = options["duration_s"]
    return {
        "ok": len(latencies_ms),
        "failures": failures,
        "rate_per_s": round(len(latencies_ms) / duration_s, 1),
        "latency_ms": summarize_ms(latencies_ms),
    }


if __name__ == "__main__":
    run_tool(main)
