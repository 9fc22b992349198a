"""Simulated phones (mensajero_agent.Agent) and the send-to-task latency probe.

The phones are real agents with the simulated backend: they register, ping, take tasks
and report sending, sent and delivered. The `latency` command POSTs single sends on an
open-loop schedule from this same process and matches each response's message_id with
the moment its task frame reached a phone, so both ends read one clock. Commands (JSON on
stdin): connect, latency, status, stop.
"""

import asyncio
import contextlib
import time
from typing import Any

import orjson

from bench import load
from bench.stats import summarize_ms
from bench.toolmain import CommandHandler, run_command_tool
from mensajero_agent.agent import Agent, AgentConfig
from mensajero_agent.backend import SimulatedBackend

CONNECT_CONCURRENCY = 50
REGISTER_TIMEOUT_S = 60.0


class Phones:
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.agents: list[Agent] = []
        self.runs: list[asyncio.Task[None]] = []
        # message_id → monotonic time of the first task frame for it.
        self.task_arrivals: dict[str, float] = {}
        self.reports = 0
        self.errors: dict[str, int] = {}

    def _on_event(self, event: dict[str, Any]) -> None:
        name = event["event"]
        if name == "task":
            self.task_arrivals.setdefault(event["message_id"], time.monotonic())
        elif name == "report_ack":
            self.reports += 1
        elif name == "error":
            code = str(event.get("error"))
            self.errors[code] = self.errors.get(code, 0) + 1

    async def connect(self, _: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def start_one(index: int, api_key: str) -> bool:
            agent = Agent(
                AgentConfig(url=self.options["hub_url"], api_key=api_key),
                SimulatedBackend(
                    send_delay_ms=self.options.get("send_delay_ms", 200),
                    delivery_delay_ms=self.options.get("delivery_delay_ms", 500),
                    seed=index,
                ),
                on_event=self._on_event,
                seed=index,
            )
            self.agents.append(agent)
            async with gate:
                self.runs.append(asyncio.create_task(agent.run()))
                try:
                    async with asyncio.timeout(REGISTER_TIMEOUT_S):
                        await agent.registered.wait()
                except TimeoutError:
                    return False
                return True

        results = await asyncio.gather(
            *(start_one(i, key) for i, key in enumerate(self.options["api_keys"]))
        )
        return {
            "registered": sum(results),
            "failed": len(results) - sum(results),
            "elapsed_s": round(time.monotonic() - started, 3),
        }

    async def latency(self, options: dict[str, Any]) -> dict[str, Any]:
        """POST at `rate_per_s` and return POST-start-to-task-frame latencies."""
        target = load.Target(
            host=options["host"],
            port=options["port"],
            path=options["path"],
            body_template=options["body_template"],
            headers=options["headers"],
        )
        result = await load.open_loop(
            target,
            options["rate_per_s"],
            options["warmup_s"],
            options["duration_s"],
            options["concurrency"],
            keep_bodies=True,
            counter_start=options.get("counter_start", 0),
        )
        sent: list[tuple[float, str]] = []
        for scheduled_at, body in result.bodies:
            message_id = orjson.loads(body)["data"]["message_id"]
            sent.append((scheduled_at, message_id))

        # Tasks of the last requests may still be on their way; agents report them
        # through a callback, so polling the record is simplest.
        deadline = time.monotonic() + options.get("settle_s", 5.0)
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            message_id not in self.task_arrivals for _, message_id in sent
        ):
            await asyncio.sleep(0.05)

        latencies_ms = [
            (self.task_arrivals[message_id] - scheduled_at) * 1000
            for scheduled_at, message_id in sent
            if message_id in self.task_arrivals
        ]
        return {
            "post": result.summary(),
            "to_task_ms": summarize_ms(latencies_ms),
            "without_task": len(sent) - len(latencies_ms),
        }

    async def status(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "registered": sum(1 for agent in self.agents if agent.registered.is_set()),
            "tasks": len(self.task_arrivals),
            "report_acks": self.reports,
            "errors": self.errors,
        }

    async def stop(self, _: dict[str, Any]) -> dict[str, Any]:
        status = await self.status({})
        await asyncio.gather(
            *(agent.stop() for agent in self.agents), return_exceptions=True
        )
        for run in self.runs:
            run.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.runs, return_exceptions=True)
        return status


async def start(options: dict[str, Any]) -> dict[str, CommandHandler]:
    phones = Phones(options)
    return {
        "connect": phones.connect,
        "latency": phones.latency,
        "status": phones.status,
        "stop": phones.stop,
    }


if __name__ == "__main__":
    run_command_tool(start)
