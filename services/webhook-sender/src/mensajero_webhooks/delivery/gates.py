"""Per-webhook admission inside one worker process, without I/O.

Each webhook gets a gate with two rules:

- a cap on its attempts in flight (WEBHOOK_CONCURRENCY_PER_WEBHOOK), so that an endpoint
  that never responds takes at most that many of the worker's WEBHOOK_CONCURRENCY slots.
- a circuit breaker: after WEBHOOK_BREAKER_FAILURES consecutive failed attempts (timeout,
  connection error, 429 or 5xx) the webhook is paused for WEBHOOK_BREAKER_OPEN_S. Then
  one attempt is let through as a probe: a response closes the breaker, another failure
  pauses the webhook again.

A delivery that its gate does not admit is parked here, in arrival order, with the
`next_attempt_at` that Postgres stored for it when it was parked (its parking token).
The gates count per process: with several worker processes, each has its own caps and
breakers.

NOTE: the cap is per webhook, not per host. Many webhooks whose URLs share one hanging
host can still fill every slot until each of their breakers has opened.
"""

import enum
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime


class Health(enum.Enum):
    """The state of an endpoint, as one attempt shows it."""

    # A response that is neither 429 nor 5xx: the endpoint is up.
    RESPONSIVE = "responsive"
    # A timeout, a connection error, 429 or 5xx.
    FAILING = "failing"
    # No POST was made (an unsafe URL, a disabled webhook, a cancelled attempt).
    UNKNOWN = "unknown"


class BreakerChange(enum.Enum):
    OPENED = "opened"
    CLOSED = "closed"


@dataclass
class _Gate:
    in_flight: int = 0
    parked: dict[uuid.UUID, datetime] = field(default_factory=dict)
    consecutive_failures: int = 0
    # CLOCK_MONOTONIC time at which the open breaker lets a probe through.
    open_until: float | None = None
    probing: bool = False
    drainers: int = 0

    @property
    def idle(self) -> bool:
        return (
            self.in_flight == 0
            and not self.parked
            and self.consecutive_failures == 0
            and self.open_until is None
            and self.drainers == 0
        )


class WebhookGates:
    def __init__(
        self,
        *,
        max_in_flight: int,
        breaker_failures: int,
        breaker_open_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_in_flight = max_in_flight
        # 0 turns the breaker off.
        self.breaker_failures = breaker_failures
        self.breaker_open_s = breaker_open_s
        self._clock = clock
        self._gates: dict[uuid.UUID, _Gate] = {}

    def _gate(self, webhook_id: uuid.UUID) -> _Gate:
        gate = self._gates.get(webhook_id)
        if gate is None:
            gate = self._gates[webhook_id] = _Gate()
        return gate

    def _forget_if_idle(self, webhook_id: uuid.UUID) -> None:
        gate = self._gates.get(webhook_id)
        if gate is not None and gate.idle:
            del self._gates[webhook_id]

    def _admits(self, gate: _Gate) -> bool:
        if gate.in_flight >= self.max_in_flight:
            return False
        if gate.open_until is None:
            return True
        return self._clock() >= gate.open_until and not gate.probing

    def admits(self, webhook_id: uuid.UUID) -> bool:
        gate = self._gates.get(webhook_id)
        return gate is None or self._admits(gate)

    def blocked(self) -> list[uuid.UUID]:
        """Return the webhooks that would not admit an attempt now."""
        return [
            webhook_id
            for webhook_id, gate in self._gates.items()
            if not self._admits(gate)
        ]

    def acquire(self, webhook_id: uuid.UUID) -> bool:
        """Take a slot for one attempt, or return False if the gate does not admit it."""
        gate = self._gate(webhook_id)
        if not self._admits(gate):
            self._forget_if_idle(webhook_id)
            return False
        if gate.open_until is not None:
            gate.probing = True
        gate.in_flight += 1
        return True

    def release(self, webhook_id: uuid.UUID, health: Health) -> BreakerChange | None:
        """Give back the slot of an ended attempt, and return the breaker's change if any."""
        gate = self._gate(webhook_id)
        gate.in_flight = max(0, gate.in_flight - 1)
        change = None
        if health is Health.RESPONSIVE:
            if gate.open_until is not None:
                change = BreakerChange.CLOSED
            gate.consecutive_failures = 0
            gate.open_until = None
            gate.probing = False
        elif health is Health.FAILING:
            gate.consecutive_failures += 1
            if gate.probing:
                gate.probing = False
                gate.open_until = self._clock() + self.breaker_open_s
                change = BreakerChange.OPENED
            elif (
                gate.open_until is None
                and self.breaker_failures
                and gate.consecutive_failures >= self.breaker_failures
            ):
                gate.open_until = self._clock() + self.breaker_open_s
                change = BreakerChange.OPENED
        elif gate.probing and gate.in_flight == 0:
            # The probe ended with neither a response nor a failure, so the next attempt
            # probes instead.
            gate.probing = False
        self._forget_if_idle(webhook_id)
        return change

    def park(
        self, webhook_id: uuid.UUID, delivery_id: uuid.UUID, parked_until: datetime
    ) -> None:
        """Keep a delivery until its gate admits it. A delivery parked again keeps its place."""
        self._gate(webhook_id).parked[delivery_id] = parked_until

    def repark(
        self, webhook_id: uuid.UUID, delivery_id: uuid.UUID, parked_until: datetime
    ) -> None:
        """Give a delivery that is still parked its new parking token."""
        gate = self._gates.get(webhook_id)
        if gate is not None and delivery_id in gate.parked:
            gate.parked[delivery_id] = parked_until

    def take_parked(self, webhook_id: uuid.UUID) -> tuple[uuid.UUID, datetime] | None:
        """Take the oldest parked delivery and a slot for it, if the gate admits one."""
        gate = self._gates.get(webhook_id)
        if gate is None or not gate.parked or not self._admits(gate):
            return None
        delivery_id = next(iter(gate.parked))
        parked_until = gate.parked.pop(delivery_id)
        self.acquire(webhook_id)
        return delivery_id, parked_until

    def take_all_parked(self) -> dict[uuid.UUID, datetime]:
        """Remove every parked delivery from the gates; return each with its parking token."""
        taken: dict[uuid.UUID, datetime] = {}
        for webhook_id, gate in list(self._gates.items()):
            taken.update(gate.parked)
            gate.parked.clear()
            self._forget_if_idle(webhook_id)
        return taken

    def parked_count(self, webhook_id: uuid.UUID) -> int:
        gate = self._gates.get(webhook_id)
        return len(gate.parked) if gate is not None else 0

    def probe_in_s(self, webhook_id: uuid.UUID) -> float | None:
        """Return the seconds until the open breaker lets a probe through, or None when
        the webhook is not paused or its probe is already due."""
        gate = self._gates.get(webhook_id)
        if gate is None or gate.open_until is None:
            return None
        left_s = gate.open_until - self._clock()
        return left_s if left_s > 0 else None

    def pause_state(self, webhook_id: uuid.UUID) -> tuple[float | None, bool]:
        """Return when the open breaker lets a probe through (None when it is closed),
        and whether the probe runs.

        The parking time of the webhook's deliveries depends on this pair, which changes
        when the breaker opens or closes and when a probe starts or ends.
        """
        gate = self._gates.get(webhook_id)
        if gate is None:
            return None, False
        return gate.open_until, gate.probing

    def is_probing(self, webhook_id: uuid.UUID) -> bool:
        gate = self._gates.get(webhook_id)
        return gate is not None and gate.probing

    def parked_deliveries(self, webhook_id: uuid.UUID) -> dict[uuid.UUID, datetime]:
        """Return the parked deliveries of a webhook with their parking tokens."""
        gate = self._gates.get(webhook_id)
        return dict(gate.parked) if gate is not None else {}

    def is_open(self, webhook_id: uuid.UUID) -> bool:
        gate = self._gates.get(webhook_id)
        return gate is not None and gate.open_until is not None

    def wants_drainer(self, webhook_id: uuid.UUID) -> bool:
        """Return whether another drainer would find parked work that the gate admits now."""
        gate = self._gates.get(webhook_id)
        if gate is None or not self._admits(gate):
            return False
        return gate.drainers < min(self.max_in_flight, len(gate.parked))

    def drainer_started(self, webhook_id: uuid.UUID) -> None:
        self._gate(webhook_id).drainers += 1

    def drainer_ended(self, webhook_id: uuid.UUID) -> None:
        gate = self._gate(webhook_id)
        gate.drainers = max(0, gate.drainers - 1)
        self._forget_if_idle(webhook_id)

    def in_flight(self, webhook_id: uuid.UUID) -> int:
        gate = self._gates.get(webhook_id)
        return gate.in_flight if gate is not None else 0
