"""Backoff of the retries that follow a failure of Postgres or Redis, without I/O.

One RetryBackoff serves a whole worker process. While Postgres is down, the tasks
waiting in it retry together once per wait, and the wait grows with the outage however
many tasks fail.
"""

import random
import time
from collections.abc import Callable

# The first wait after a transient failure, doubled after each further one.
TRANSIENT_RETRY_BASE_DELAY_S = 1.0
# The maximum wait, before jitter. It equals the default WEBHOOK_SWEEP_INTERVAL_S, so
# after a long outage a retry comes about as soon as the sweep would queue the same
# deliveries again.
TRANSIENT_RETRY_MAX_DELAY_S = 30.0


class RetryBackoff:
    """Exponential backoff shared by the tasks of one process: the n-th failure in a
    row waits base × 2^(n-1) seconds, capped at `max_delay_s`, and then ±20 % jitter.

    Failures recorded before the current wait has ended count as one, so that tasks
    failing together lengthen the wait by one step, not by one step each.
    """

    def __init__(
        self,
        *,
        base_delay_s: float = TRANSIENT_RETRY_BASE_DELAY_S,
        max_delay_s: float = TRANSIENT_RETRY_MAX_DELAY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._clock = clock
        self.failures = 0
        # Clock time before which no retry should start.
        self._resume_at = 0.0

    def record_failure(self) -> float:
        """Count a transient failure and return the seconds until a retry may start."""
        now = self._clock()
        if now < self._resume_at:
            return self._resume_at - now
        self.failures += 1
        # The exponent is capped so that a long outage cannot overflow the float.
        steps = min(self.failures - 1, 32)
        delay_s = min(self.max_delay_s, self.base_delay_s * 2**steps)
        delay_s *= random.uniform(0.8, 1.2)
        self._resume_at = now + delay_s
        return delay_s

    def record_success(self) -> None:
        """End the backoff: the next retry may start now, and the next failure waits the
        base delay. A task already waiting finishes its wait."""
        self.failures = 0
        self._resume_at = 0.0

    def wait_s(self) -> float:
        """Return the seconds left before a retry may start, 0 when it may start now."""
        return max(0.0, self._resume_at - self._clock())
