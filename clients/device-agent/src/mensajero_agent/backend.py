"""How the agent "sends" an SMS: a pluggable backend, and a simulated one for tests and demos."""

import asyncio
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

# Android's SmsManager names its send errors like this; a phone app reports them as is.
SIMULATED_SEND_ERROR = "RESULT_ERROR_GENERIC_FAILURE (simulated)"


@dataclass(frozen=True)
class SendOutcome:
    """The result of one send: `sent`, or `failed` with an error text."""

    status: str
    error: str | None = None

    @classmethod
    def sent(cls) -> "SendOutcome":
        return cls("sent")

    @classmethod
    def failed(cls, error: str) -> "SendOutcome":
        return cls("failed", error)


class SendingBackend(ABC):
    """Sends the SMS of a task; a real phone would call Android's SmsManager here."""

    # True when a `send` cancelled before it returns never sent the SMS. The agent then
    # reports such a send `failed` and retryable when it stops. Otherwise the outcome of
    # a cancelled send is unknown, so the agent never sends that attempt again.
    unsent_when_cancelled: bool = False

    @abstractmethod
    async def send(self, task: dict[str, Any]) -> SendOutcome:
        """Send the task's SMS and return whether the network accepted it."""

    @abstractmethod
    async def wait_for_delivery(self, task: dict[str, Any]) -> SendOutcome | None:
        """Wait for the delivery report of a sent SMS; None when none will come.

        Returns `SendOutcome("delivered")`, or `failed` when the network reports that the
        SMS could not be delivered. After a restart of the agent, `task` has only
        `message_id` and `attempt`, because the state file does not keep the task.
        """


class SimulatedBackend(SendingBackend):
    """Pretends to send: waits `send_delay_ms`, fails a `failure_rate` share of sends.

    Delivery reports come `delivery_delay_ms` after a successful send; with
    `delivery_reports=False` none come, like a phone whose carrier sends no reports.
    A send cancelled during its delay has sent nothing.
    """

    unsent_when_cancelled = True

    def __init__(
        self,
        *,
        send_delay_ms: float = 200.0,
        failure_rate: float = 0.0,
        delivery_delay_ms: float = 500.0,
        delivery_reports: bool = True,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(
                f"failure_rate must be between 0 and 1, got {failure_rate}"
            )
        if send_delay_ms < 0 or delivery_delay_ms < 0:
            raise ValueError("delays must not be negative")
        self.send_delay_ms = send_delay_ms
        self.failure_rate = failure_rate
        self.delivery_delay_ms = delivery_delay_ms
        self.delivery_reports = delivery_reports
        self._random = random.Random(seed)
        self.sent_count = 0

    async def send(self, task: dict[str, Any]) -> SendOutcome:
        await asyncio.sleep(self.send_delay_ms / 1000)
        if self._random.random() < self.failure_rate:
            return SendOutcome.failed(SIMULATED_SEND_ERROR)
        self.sent_count += 1
        return SendOutcome.sent()

    async def wait_for_delivery(self, task: dict[str, Any]) -> SendOutcome | None:
        if not self.delivery_reports:
            return None
        await asyncio.sleep(self.delivery_delay_ms / 1000)
        return SendOutcome("delivered")
