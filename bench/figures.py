"""Figures of the sending path: API accept rate, dispatcher, POST-to-task latency, bulk.

Senders are `mode.senders` users on the Enterprise plan, each with an equal share of
`mode.phones` simulated phones (bench.tools.phones), all connected to the stack's hub.
"""

import asyncio
import time
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bench import pg
from bench.baselines import SEND_BODY_TEMPLATE, latency_sum_ms
from bench.console import say
from bench.procs import Proc
from bench.results import Figure
from bench.stack import BenchUser, Stack, create_users, insert_devices, seed_history
from bench.stats import percentile

if TYPE_CHECKING:
    from bench.run import Run

SEND_PATH = "/api/v1/sms/send"
BULK_PATH = "/api/v1/sms/send-bulk"
LAG_POLL_S = 0.01
DRAIN_TIMEOUT_S = 60.0
QUIET_TIMEOUT_S = 60.0
BULK_RECIPIENTS = 1000
# The latency probe's recipients are +34602xxxxxx, so its messages can be found again.
LATENCY_COUNTER_START = 2_000_000
LATENCY_NUMBER_PREFIX = "+34602"


class LagMonitor:
    """Samples the length of the new-message stream (unread plus unacknowledged entries;
    the dispatcher deletes each entry once handled) every LAG_POLL_S."""

    def __init__(self, redis: Redis, stream: str) -> None:
        self.redis = redis
        self.stream = stream
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "LagMonitor":
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            self.samples.append((time.monotonic(), await self.redis.xlen(self.stream)))
            await asyncio.sleep(LAG_POLL_S)

    async def wait_until_empty(
        self, since: float, timeout_s: float = DRAIN_TIMEOUT_S
    ) -> float:
        """Return the first sample time at or after `since` with an empty stream."""
        async with asyncio.timeout(timeout_s):
            while True:
                for sampled_at, length in reversed(self.samples):
                    if sampled_at < since:
                        break
                    if length == 0:
                        return self.first_empty_after(since)
                await asyncio.sleep(LAG_POLL_S)

    def first_empty_after(self, moment: float) -> float:
        for sampled_at, length in self.samples:
            if sampled_at >= moment and length == 0:
                return sampled_at
        raise LookupError("the stream was never empty after that moment")

    def max_length(self) -> int:
        return max((length for _, length in self.samples), default=0)


def _send_target(stack: Stack, senders: list[BenchUser]) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": stack.api_port,
        "path": SEND_PATH,
        "body_template": SEND_BODY_TEMPLATE,
        "headers": [user.headers for user in senders],
    }


async def _wait_stream_empty(redis: Redis, stream: str) -> None:
    """Wait until the dispatcher has handled every entry (it deletes each one)."""
    async with asyncio.timeout(QUIET_TIMEOUT_S):
        # Redis has no notification for this; polling it is the way.
        while await redis.xlen(stream):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def _last_entry_id(redis: Redis, stream: str) -> bytes | None:
    try:
        info = await redis.xinfo_stream(stream)
    except ResponseError:
        return None  # no stream yet
    last_id: bytes = info["last-generated-id"]
    return last_id


async def _wait_signal_handled(redis: Redis, stream: str, before: bytes | None) -> None:
    """Wait until entries newer than `before` have arrived and been handled.

    The API signals the dispatcher of a bulk send after its response, so right after the
    response the stream may still be empty.
    """
    async with asyncio.timeout(QUIET_TIMEOUT_S):
        while await _last_entry_id(redis, stream) == before:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await _wait_stream_empty(redis, stream)


async def _wait_quiet(redis: Redis, stream: str, phones: Proc) -> None:
    """Wait until the dispatcher has read everything and the phones stopped reporting.

    After QUIET_TIMEOUT_S the next step starts anyway, and says so: a slow hub may
    still be working through the reports of the last step.
    """
    try:
        await _wait_stream_empty(redis, stream)
        async with asyncio.timeout(QUIET_TIMEOUT_S):
            last = -1
            while True:
                acks = (await phones.command("status"))["report_acks"]
                if acks == last:
                    return
                last = acks
                await asyncio.sleep(0.5)
    except TimeoutError:
        say(f"  still busy after {QUIET_TIMEOUT_S:g} s; going on")


async def measure_api(run: "Run", stack: Stack) -> None:
    mode = run.mode
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as client:
        users = await create_users(client, run.data.dsn, "sender", mode.senders + 1)
    # The bulk sender has no phones, so its 1000-message requests are timed without
    # the tasks and reports of earlier ones competing for the CPU.
    senders, bulk_sender = users[:-1], users[-1]
    per_sender = mode.phones // mode.senders
    keys = await insert_devices(
        run.data.dsn, [user.user_id for user in senders], per_sender, "bench phone"
    )
    say(f"stack: seeding a history of {mode.history_messages} messages")
    run.measurements["history"] = await seed_history(
        run.data.dsn, [user.user_id for user in senders], mode.history_messages
    )
    phones = await run.processes.start_tool(
        "phones",
        "phones",
        {
            "hub_url": stack.hub_ws_url,
            "api_keys": [key for owner_keys in keys.values() for key in owner_keys],
        },
        interactive=True,
    )
    say(f"stack: connecting {mode.phones} phones")
    connected = await phones.command("connect")
    run.measurements["phones_connect"] = connected

    redis: Redis = Redis.from_url(run.data.redis_url)
    stream = run.data.keys.new_messages_stream
    # Opened before the load, which may take every free Postgres connection.
    database = await pg.connect(run.data.dsn)
    try:
        async with LagMonitor(redis, stream) as lag:
            send_rate = await _measure_send_rate(run, stack, senders, lag)
        await _wait_quiet(redis, stream, phones)
        await _measure_latency(run, stack, senders, phones, send_rate, database)
        await _wait_quiet(redis, stream, phones)
        async with LagMonitor(redis, stream) as lag:
            await _measure_dispatcher_capacity(run, stack, senders, lag, send_rate)
        await _wait_quiet(redis, stream, phones)
        await _measure_bulk(run, stack, bulk_sender, redis, stream)
        run.measurements["phones"] = await phones.command("stop")
    finally:
        await redis.aclose()
        await database.close()
        await run.processes.stop(phones)


async def _measure_send_rate(
    run: "Run", stack: Stack, senders: list[BenchUser], lag: LagMonitor
) -> float:
    say("figure: single sends per second")
    mode = run.mode
    result = await run.measure_tool(
        "api-send-load",
        "http_load",
        {
            **_send_target(stack, senders),
            "mode": "closed",
            "concurrency": mode.http_concurrency,
            "warmup_s": mode.warmup_s,
            "duration_s": mode.measure_s,
        },
        stack.services(),
    )
    rate = float(result["rate_per_s"])
    errors = {code: n for code, n in result["statuses"].items() if code[0] != "2"}
    note = f"non-2xx answers: {errors}" if errors else ""
    bare = run.baselines["bare_asgi"]["max"]["rate_per_s"]
    inserts = run.baselines["postgres_insert_commit"]["rate_per_s"]
    run.report.add(
        Figure(
            "api_send_rate_vs_bare_asgi",
            "single sends accepted per second (vs bare ASGI)",
            rate,
            "req/s",
            "ratio>=",
            0.5,
            baseline=bare,
            baseline_title="bare ASGI rate",
            note=note,
        )
    )
    run.report.add(
        Figure(
            "api_send_rate_vs_insert_commit",
            "single sends accepted per second (vs insert+commit)",
            rate,
            "req/s",
            "ratio>=",
            0.7,
            baseline=inserts,
            baseline_title="raw INSERT+COMMIT rate",
        )
    )

    # Stream lag after the burst: from the last accepted send to an empty stream.
    last_ok_at = result["last_ok_at"] or time.monotonic()
    drained_at = await lag.wait_until_empty(since=last_ok_at)
    drain_s = max(0.0, drained_at - last_ok_at)
    run.measurements["send_rate_lag"] = {
        "max_stream_length": lag.max_length(),
        "drain_s": drain_s,
    }
    run.report.add(
        Figure(
            "dispatcher_lag_drain_after_burst",
            "dispatcher stream lag back to 0 after the send burst",
            drain_s,
            "s",
            "value<=",
            1.0,
            note=f"longest stream during the burst: {lag.max_length()} entries",
        )
    )
    return rate


async def _measure_latency(
    run: "Run",
    stack: Stack,
    senders: list[BenchUser],
    phones: Proc,
    max_rate: float,
    database: asyncpg.Connection,
) -> None:
    say("figure: POST to task frame latency")
    mode = run.mode
    rate = max(1.0, max_rate / 2)
    before = run.cpu_snapshot()
    result = await phones.command(
        "latency",
        **_send_target(stack, senders),
        rate_per_s=rate,
        warmup_s=mode.warmup_s,
        duration_s=mode.measure_s,
        concurrency=mode.http_concurrency,
        counter_start=LATENCY_COUNTER_START,
    )
    result["cpu_s_by_process"] = run.cpu_used(before, run.cpu_snapshot())
    result["rate_per_s"] = rate
    result["created_to_assigned_ms"] = await _assignment_delays(
        database, LATENCY_NUMBER_PREFIX
    )
    run.measurements["send_to_task_latency"] = result
    latency = result["to_task_ms"]
    missing = result["without_task"]
    note = (
        f"at {rate:.0f} sends/s; {missing} tasks did not arrive within 5 s"
        if missing
        else f"at {rate:.0f} sends/s"
    )
    for name, fraction, threshold in (("p50", 0.5, 2.0), ("p99", 0.99, 3.0)):
        run.report.add(
            Figure(
                f"send_to_task_latency_{name}",
                f"POST to task frame at the phone, {name}",
                latency[name],
                "ms",
                "ratio<=",
                threshold,
                baseline=latency_sum_ms(run.baselines, name),
                baseline_title=f"sum of raw step {name}s",
                note=note if fraction == 0.5 else "",
            )
        )


async def _assignment_delays(
    database: asyncpg.Connection, number_prefix: str
) -> dict[str, float | None]:
    """Return percentiles of the time from a message's insert to its assignment.

    `created_at` is the API transaction's start and `assigned_at` the dispatcher's
    transaction start, so this is the API-to-dispatcher part of the latency.
    """
    row = await database.fetchrow(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50, "
        "percentile_cont(0.99) WITHIN GROUP (ORDER BY d) AS p99 FROM ("
        "SELECT extract(epoch FROM assigned_at - created_at) * 1000 AS d "
        "FROM smsmessage WHERE to_number LIKE $1 AND assigned_at IS NOT NULL) AS t",
        number_prefix + "%",
    )
    return {
        "p50": None if row["p50"] is None else round(row["p50"], 1),
        "p99": None if row["p99"] is None else round(row["p99"], 1),
    }


async def _measure_dispatcher_capacity(
    run: "Run",
    stack: Stack,
    senders: list[BenchUser],
    lag: LagMonitor,
    api_rate: float,
) -> None:
    """Let a backlog build while the dispatcher is stopped (SIGSTOP), then time its drain."""
    say("figure: dispatcher assignment rate")
    mode = run.mode
    stack.dispatcher.pause()
    try:
        burst = await run.measure_tool(
            "dispatcher-burst",
            "http_load",
            {
                **_send_target(stack, senders),
                "mode": "count",
                "concurrency": mode.http_concurrency,
                "total": mode.dispatcher_burst,
                "counter_start": 4_000_000,
            },
            stack.services(),
        )
    finally:
        resumed_at = time.monotonic()
        stack.dispatcher.resume()
    before = run.cpu_snapshot()
    drained_at = await lag.wait_until_empty(since=resumed_at)
    elapsed_s = drained_at - resumed_at
    rate = burst["ok"] / elapsed_s if elapsed_s > 0 else None
    run.measurements["dispatcher_capacity"] = {
        "backlog": burst["ok"],
        "drain_s": round(elapsed_s, 3),
        "cpu_s_by_process": run.cpu_used(before, run.cpu_snapshot()),
    }
    run.report.add(
        Figure(
            "dispatcher_assign_rate",
            "dispatcher assignments per second (backlog drain)",
            rate,
            "msg/s",
            "ratio>=",
            1.0,
            baseline=api_rate,
            baseline_title="API accept rate",
            note=f"a backlog of {burst['ok']} messages, built while the dispatcher was stopped",
        )
    )


def _recipients(count: int, offset: int) -> list[str]:
    return [f"+3461{(offset + index) % 10_000_000:07d}" for index in range(count)]


async def _measure_bulk(
    run: "Run", stack: Stack, user: BenchUser, redis: Redis, stream: str
) -> None:
    say("figure: 1000-recipient bulk send")
    timings_ms: list[float] = []
    failure = ""
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as client:
        for index in range(run.mode.bulk_requests):
            payload = {
                "recipients": _recipients(BULK_RECIPIENTS, index * BULK_RECIPIENTS),
                "body": "Benchmark bulk message",
            }
            before = await _last_entry_id(redis, stream)
            started = time.perf_counter()
            response = await client.post(BULK_PATH, json=payload, headers=user.headers)
            elapsed_ms = (time.perf_counter() - started) * 1000
            if response.status_code != 201:
                failure = f"{response.status_code} {response.text[:200]}"
                break
            accepted = response.json()["data"]["accepted"]
            if accepted != BULK_RECIPIENTS:
                failure = f"only {accepted} of {BULK_RECIPIENTS} recipients accepted"
                break
            timings_ms.append(elapsed_ms)
            # The next request starts once the dispatcher has read this one's messages.
            await _wait_signal_handled(redis, stream, before)

    copies = run.baselines["postgres_1000_rows"]
    baseline = copies["copy_ms"]["p50"]
    median = percentile(timings_ms, 0.5)
    run.measurements["bulk"] = {"timings_ms": timings_ms, "failure": failure}
    # The raw table has the foreign keys of `smsmessage`, as the API's inserts do.
    # Without them the COPY is faster, and that ratio is given too.
    without_keys = copies["copy_without_foreign_keys_ms"]["p50"]
    note = failure
    if not failure and median is not None and without_keys:
        note = (
            f"{median / without_keys:.2f} × the COPY into a table without foreign "
            f"keys ({without_keys:.1f} ms)"
        )
    run.report.add(
        Figure(
            "bulk_1000_accept_time",
            "1000-recipient bulk request accepted (median)",
            median,
            "ms",
            "ratio<=",
            3.0,
            baseline=baseline,
            baseline_title="raw COPY of 1000 rows",
            note=note,
        )
    )
