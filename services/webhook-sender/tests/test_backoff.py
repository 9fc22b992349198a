import pytest

from mensajero_webhooks.delivery.backoff import RetryBackoff


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_backoff(clock: Clock) -> RetryBackoff:
    return RetryBackoff(base_delay_s=1.0, max_delay_s=8.0, clock=clock)


def test_backoff_doubles_up_to_maximum() -> None:
    clock = Clock()
    backoff = make_backoff(clock)

    delays = []
    for _ in range(6):
        delay_s = backoff.record_failure()
        delays.append(delay_s)
        assert backoff.wait_s() == pytest.approx(delay_s)
        clock.now += delay_s

    for delay_s, expected_s in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert expected_s * 0.8 <= delay_s <= expected_s * 1.2
    assert backoff.wait_s() == 0


def test_backoff_counts_failures_in_wait_once() -> None:
    clock = Clock()
    backoff = make_backoff(clock)

    first_s = backoff.record_failure()
    clock.now += first_s / 2
    # Other tasks that failed at the same time wait for the same end.
    assert backoff.record_failure() == pytest.approx(first_s / 2)
    assert backoff.record_failure() == pytest.approx(first_s / 2)
    assert backoff.failures == 1

    # Exactly the end of the first wait: two halves added may fall short of it.
    clock.now = 100.0 + first_s
    second_s = backoff.record_failure()
    assert backoff.failures == 2
    assert 1.6 <= second_s <= 2.4


def test_backoff_success_resets() -> None:
    clock = Clock()
    backoff = make_backoff(clock)
    for _ in range(3):
        clock.now += backoff.record_failure()
    backoff.record_failure()

    backoff.record_success()

    assert backoff.failures == 0
    assert backoff.wait_s() == 0
    assert 0.8 <= backoff.record_failure() <= 1.2


def test_backoff_long_outage_stays_capped() -> None:
    clock = Clock()
    backoff = make_backoff(clock)
    for _ in range(2_000):
        clock.now += backoff.record_failure()

    delay_s = backoff.record_failure()
    assert backoff.failures == 2_001
    assert 8.0 * 0.8 <= delay_s <= 8.0 * 1.2
