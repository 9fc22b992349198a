"""Events the agent reports as it works, and a recorder that tests wait on.

Every event is a dict with `event` (its name), `at` (ISO 8601 UTC) and its own fields:
connected, registered, task, task_dropped (a task that the agent did not send, see
below), report, report_ack, incoming, incoming_ack, error, paused (sending stopped for
the `retry_after_s` of a `rate_limited` error), disconnected, stopping (`stop()` began,
with the sends `in_flight` and the `grace_s` it waits for them), stopped. The command
line prints each one as a JSON line.

A task_dropped event has the message's `status` from the server's reply and a
`reason`: `moved` (the task went to another attempt or back to the queue), `ended`
(the message failed or expired), `already_sent` (the SMS went out before, under this
attempt or an earlier one, possibly from another phone) or `rejected` (an `error`
frame, whose code is in `error`). Those are replies to the agent's `sending` claim.
A task that came while the agent was stopping has `reason` `stopping`, `status` None
and no claim, and the server offers it again on the next connection.
"""

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

EventHandler = Callable[[dict[str, Any]], None]


def make_event(name: str, /, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": name,
        "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    event.update(fields)
    return event


class EventRecorder:
    """Keeps every event and lets a caller wait for the one it expects."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for condition, future in list(self._waiters):
            if not future.done() and condition():
                future.set_result(None)

    def matching(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            event
            for event in self.events
            if event["event"] == name
            and all(event.get(key) == value for key, value in fields.items())
        ]

    async def wait_for(
        self, name: str, *, count: int = 1, timeout_s: float = 5.0, **fields: Any
    ) -> dict[str, Any]:
        """Return the `count`-th event named `name` with these fields, waiting for it."""

        def arrived() -> bool:
            return len(self.matching(name, **fields)) >= count

        if not arrived():
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiter = (arrived, future)
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout_s):
                    await future
            except TimeoutError:
                seen = [event["event"] for event in self.events]
                raise TimeoutError(
                    f"no {count}x {name} event with {fields} within {timeout_s} s; "
                    f"events so far: {seen}"
                ) from None
            finally:
                self._waiters.remove(waiter)
        return self.matching(name, **fields)[count - 1]
