import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from test_delivery import (
    SessionFactory,
    create_user_with_webhook,
    delivery_state,
    delivery_worker,
    record_incoming,
    wait_until,
)

from mensajero_common.models import WebhookDelivery
from mensajero_common.settings import Settings
from mensajero_common.testing import WebhookReceiver, answer_lifespan, serve_app
from mensajero_common.webhook_outbox import queue_deliveries
from mensajero_common.webhooks import generate_secret
from mensajero_webhooks.delivery import repository
from mensajero_webhooks.delivery.gates import BreakerChange, Health, WebhookGates
from mensajero_webhooks.delivery.service import (
    PARKED,
    DeliveryContext,
    attempt_delivery,
    requeue_due_deliveries,
)

PARKED_AT = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_gates(
    clock: Clock, max_in_flight: int = 2, breaker_failures: int = 3
) -> WebhookGates:
    return WebhookGates(
        max_in_flight=max_in_flight,
        breaker_failures=breaker_failures,
        breaker_open_s=10.0,
        clock=clock,
    )


def test_gates_cap_attempts_in_flight() -> None:
    gates = make_gates(Clock())
    webhook_id, other_id = uuid.uuid4(), uuid.uuid4()

    assert gates.acquire(webhook_id)
    assert gates.acquire(webhook_id)
    assert not gates.acquire(webhook_id)
    assert gates.blocked() == [webhook_id]
    assert gates.acquire(other_id)

    gates.release(webhook_id, Health.RESPONSIVE)
    assert gates.blocked() == []
    assert gates.acquire(webhook_id)


def test_gates_return_parked_in_order() -> None:
    gates = make_gates(Clock(), max_in_flight=1)
    webhook_id = uuid.uuid4()
    first, second = uuid.uuid4(), uuid.uuid4()
    assert gates.acquire(webhook_id)
    gates.park(webhook_id, first, PARKED_AT)
    gates.park(webhook_id, second, PARKED_AT)
    later = datetime(2026, 1, 2, tzinfo=UTC)
    gates.park(webhook_id, first, later)

    assert gates.take_parked(webhook_id) is None
    gates.release(webhook_id, Health.RESPONSIVE)
    assert gates.take_parked(webhook_id) == (first, later)
    assert gates.in_flight(webhook_id) == 1
    gates.release(webhook_id, Health.RESPONSIVE)
    assert gates.take_parked(webhook_id) == (second, PARKED_AT)
    gates.release(webhook_id, Health.RESPONSIVE)
    assert gates.take_parked(webhook_id) is None


def test_breaker_opens_after_consecutive_failures() -> None:
    clock = Clock()
    gates = make_gates(clock, max_in_flight=5)
    webhook_id = uuid.uuid4()

    changes = []
    for health in (Health.FAILING, Health.FAILING, Health.RESPONSIVE) + (
        Health.FAILING,
    ) * 3:
        assert gates.acquire(webhook_id)
        changes.append(gates.release(webhook_id, health))

    assert changes == [None, None, None, None, None, BreakerChange.OPENED]
    assert not gates.acquire(webhook_id)
    assert gates.blocked() == [webhook_id]


def test_breaker_probes_once_after_pause() -> None:
    clock = Clock()
    gates = make_gates(clock, max_in_flight=5, breaker_failures=1)
    webhook_id = uuid.uuid4()
    assert gates.acquire(webhook_id)
    assert gates.release(webhook_id, Health.FAILING) is BreakerChange.OPENED

    clock.now += 9.9
    assert not gates.acquire(webhook_id)
    clock.now += 0.1
    assert gates.acquire(webhook_id)
    assert not gates.acquire(webhook_id)

    assert gates.release(webhook_id, Health.FAILING) is BreakerChange.OPENED
    assert not gates.acquire(webhook_id)
    clock.now += 10.0
    assert gates.acquire(webhook_id)
    assert gates.release(webhook_id, Health.RESPONSIVE) is BreakerChange.CLOSED
    assert gates.acquire(webhook_id)
    assert gates.acquire(webhook_id)


def test_breaker_reports_probe_time() -> None:
    clock = Clock()
    gates = make_gates(clock, breaker_failures=1)
    webhook_id = uuid.uuid4()
    parked_id = uuid.uuid4()
    assert gates.probe_in_s(webhook_id) is None
    assert gates.acquire(webhook_id)
    gates.release(webhook_id, Health.FAILING)
    gates.park(webhook_id, parked_id, PARKED_AT)

    clock.now += 4.0
    assert gates.probe_in_s(webhook_id) == 6.0
    assert not gates.is_probing(webhook_id)
    later = datetime(2026, 1, 2, tzinfo=UTC)
    gates.repark(webhook_id, parked_id, later)
    gates.repark(webhook_id, uuid.uuid4(), later)
    assert gates.parked_deliveries(webhook_id) == {parked_id: later}
    clock.now += 6.0
    assert gates.probe_in_s(webhook_id) is None
    assert gates.take_parked(webhook_id) == (parked_id, later)
    assert gates.is_probing(webhook_id)


def test_breaker_off_with_zero_failures() -> None:
    gates = make_gates(Clock(), breaker_failures=0)
    webhook_id = uuid.uuid4()
    for _ in range(20):
        assert gates.acquire(webhook_id)
        assert gates.release(webhook_id, Health.FAILING) is None


class HangingReceiver:
    """An endpoint that reads each request and responds to none until `release` is set."""

    def __init__(self) -> None:
        self.count = 0
        self.release = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        self.count += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


class CountingReceiver(WebhookReceiver):
    """A WebhookReceiver that records the most requests it had open at once."""

    def __init__(self, responses: list[int], delay_s: float) -> None:
        super().__init__(responses, delay_s)
        self.open = 0
        self.max_open = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.open -= 1


async def record_many(
    session_factory: SessionFactory, url: str, count: int
) -> list[uuid.UUID]:
    user, _ = await create_user_with_webhook(session_factory, url, generate_secret())
    delivery_ids: list[uuid.UUID] = []
    for number in range(count):
        _, ids = await record_incoming(session_factory, user, body=f"sms {number}")
        delivery_ids += ids
    return delivery_ids


async def test_hanging_webhook_leaves_slots_to_others(
    settings: Settings, session_factory: SessionFactory
) -> None:
    # Without the cap, the hanging endpoint's ten jobs would hold all ten of the worker's
    # slots for the whole 60 s timeout.
    settings = settings.model_copy(
        update={"WEBHOOK_TIMEOUT_S": 60.0, "WEBHOOK_CONCURRENCY_PER_WEBHOOK": 2}
    )
    hanging = HangingReceiver()
    fast = WebhookReceiver([200])
    async with (
        serve_app(hanging) as hanging_url,
        serve_app(fast) as fast_url,
        delivery_worker(settings, session_factory, max_jobs=10) as context,
    ):
        hanging_ids = await record_many(session_factory, f"{hanging_url}/hook", 10)
        fast_ids = await record_many(session_factory, f"{fast_url}/hook", 10)
        await queue_deliveries(context.redis, context.keys, hanging_ids)
        await queue_deliveries(context.redis, context.keys, fast_ids)

        await fast.wait_for(10, timeout_s=20)
        hanging_count = hanging.count
        hanging_states = [
            await delivery_state(session_factory, delivery_id)
            for delivery_id in hanging_ids
        ]
        hanging.release.set()
        await wait_until(
            lambda: _all_have_status(session_factory, hanging_ids, "succeeded"), 20
        )

    assert len(fast.requests) == 10
    assert hanging_count == 2
    attempts = sorted(delivery.attempts for delivery, _ in hanging_states)
    assert attempts == [0] * 8 + [1] * 2
    assert all(delivery.status == "pending" for delivery, _ in hanging_states)
    assert hanging.count == 10


async def test_parked_deliveries_all_arrive(
    settings: Settings, session_factory: SessionFactory
) -> None:
    settings = settings.model_copy(update={"WEBHOOK_CONCURRENCY_PER_WEBHOOK": 1})
    receiver = CountingReceiver([200], delay_s=0.05)
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(settings, session_factory, max_jobs=10) as context,
    ):
        delivery_ids = await record_many(session_factory, f"{base_url}/hook", 8)
        await queue_deliveries(context.redis, context.keys, delivery_ids)
        await receiver.wait_for(8, timeout_s=20)
        await wait_until(
            lambda: _all_have_status(session_factory, delivery_ids, "succeeded"), 10
        )

    assert len(receiver.requests) == 8
    assert len({body for _, body, _ in receiver.requests}) == 8
    assert receiver.max_open == 1
    for delivery_id in delivery_ids:
        delivery, attempts = await delivery_state(session_factory, delivery_id)
        assert delivery.attempts == 1
        assert len(attempts) == 1


async def _all_have_status(
    session_factory: SessionFactory, delivery_ids: list[uuid.UUID], status: str
) -> bool:
    async with session_factory() as session:
        statuses = (
            await session.scalars(
                select(WebhookDelivery.status).where(
                    WebhookDelivery.id.in_(delivery_ids)
                )
            )
        ).all()
    return len(statuses) == len(delivery_ids) and set(statuses) == {status}


async def test_breaker_pauses_then_probes_again(
    settings: Settings, session_factory: SessionFactory
) -> None:
    settings = settings.model_copy(
        update={
            "WEBHOOK_CONCURRENCY_PER_WEBHOOK": 1,
            "WEBHOOK_BREAKER_FAILURES": 2,
            "WEBHOOK_BREAKER_OPEN_S": 0.5,
            "WEBHOOK_RETRY_BASE_DELAY_S": 0.05,
            "WEBHOOK_MAX_ATTEMPTS": 5,
        }
    )
    # Two failures pause the webhook; the first probe fails and pauses it again.
    receiver = WebhookReceiver([500, 500, 500, 200])
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(settings, session_factory) as context,
    ):
        delivery_ids = await record_many(session_factory, f"{base_url}/hook", 3)
        await queue_deliveries(context.redis, context.keys, delivery_ids)
        await wait_until(
            lambda: _all_have_status(session_factory, delivery_ids, "succeeded"), 20
        )

    times = [arrived for _, _, arrived in receiver.requests]
    assert len(times) >= 4
    assert times[2] - times[1] >= 0.45
    assert times[3] - times[2] >= 0.45
    for delivery_id in delivery_ids:
        delivery, attempts = await delivery_state(session_factory, delivery_id)
        assert delivery.attempts == len(attempts)
        assert attempts[-1].status_code == 200


@pytest.mark.parametrize("failed_probes", [0, 1])
async def test_paused_webhook_log_shows_probe_time(
    settings: Settings, session_factory: SessionFactory, failed_probes: int
) -> None:
    open_s = 2.0
    settings = settings.model_copy(
        update={
            "WEBHOOK_CONCURRENCY_PER_WEBHOOK": 1,
            "WEBHOOK_BREAKER_FAILURES": 1,
            "WEBHOOK_BREAKER_OPEN_S": open_s,
            "WEBHOOK_RETRY_BASE_DELAY_S": 0.05,
            "WEBHOOK_MAX_ATTEMPTS": 5,
        }
    )
    # The first attempt fails and pauses the webhook, each failed probe pauses it
    # again, and then the probe and the rest succeed.
    receiver = WebhookReceiver([500] * (1 + failed_probes) + [200] * 3)
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(settings, session_factory) as context,
    ):
        delivery_ids = await record_many(session_factory, f"{base_url}/hook", 3)
        delivery, _ = await delivery_state(session_factory, delivery_ids[0])
        webhook_id = delivery.webhook_id
        await queue_deliveries(context.redis, context.keys, delivery_ids)
        await receiver.wait_for(1 + failed_probes, timeout_s=10)
        await wait_until(
            lambda: _parked_as_logged(context, session_factory, webhook_id), 10
        )
        pause = context.gates.pause_state(webhook_id)
        paused = {
            delivery_id: await delivery_state(session_factory, delivery_id)
            for delivery_id in delivery_ids
        }
        pause_after_read = context.gates.pause_state(webhook_id)
        await wait_until(
            lambda: _all_have_status(session_factory, delivery_ids, "succeeded"), 20
        )

    assert len(receiver.requests) == 4 + failed_probes
    # The log was read during the last pause, before its probe started.
    assert pause_after_read == pause
    assert len(paused) == 3
    for delivery_id, (delivery, attempts_then) in paused.items():
        assert delivery.status == "pending"
        assert delivery.next_attempt_at is not None
        _, attempts = await delivery_state(session_factory, delivery_id)
        next_attempt = attempts[len(attempts_then)]
        # The probe starts when the pause ends and the others right after it, so the
        # log showed each next attempt within a fraction of a second.
        shown_gap_s = (
            next_attempt.started_at - delivery.next_attempt_at
        ).total_seconds()
        assert abs(shown_gap_s) < 0.5
        if attempts_then:
            assert attempts_then[-1].next_retry_at == delivery.next_attempt_at
            # Once the next attempt ran, the log shows when it started.
            retried_at = attempts[len(attempts_then) - 1].next_retry_at
            assert retried_at is not None
            retried_gap_s = (next_attempt.started_at - retried_at).total_seconds()
            assert 0 <= retried_gap_s < 0.5


async def _parked_as_logged(
    context: DeliveryContext, session_factory: SessionFactory, webhook_id: uuid.UUID
) -> bool:
    """Return whether the paused webhook's gate has parked all its pending deliveries,
    each with the `next_attempt_at` that Postgres stores for it."""
    gates = context.gates
    if not gates.is_open(webhook_id) or gates.is_probing(webhook_id):
        return False
    parked = gates.parked_deliveries(webhook_id)
    async with session_factory() as session:
        rows = await session.execute(
            select(WebhookDelivery.id, WebhookDelivery.next_attempt_at).where(
                WebhookDelivery.webhook_id == webhook_id,
                WebhookDelivery.status == "pending",
            )
        )
        stored = {delivery_id: next_attempt_at for delivery_id, next_attempt_at in rows}
    return bool(stored) and parked == stored


async def test_sweep_recovers_parked_delivery(
    settings: Settings, session_factory: SessionFactory
) -> None:
    receiver = WebhookReceiver([200])
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(settings, session_factory) as context,
    ):
        [delivery_id] = await record_many(session_factory, f"{base_url}/hook", 1)
        delivery, _ = await delivery_state(session_factory, delivery_id)
        # Parked by a process that then died, so only Postgres still has it.
        async with repository.pooled_connection(context.engine) as connection:
            parked = await repository.claim(
                connection,
                delivery_id,
                lease_s=30,
                blocked={delivery.webhook_id: 0.2},
            )
        assert isinstance(parked, repository.ParkedDelivery)
        assert await requeue_due_deliveries(context) == 0

        await wait_until(lambda: _requeued(context), 10)
        await receiver.wait_for(1, timeout_s=10)
        await wait_until(
            lambda: _all_have_status(session_factory, [delivery_id], "succeeded"), 10
        )

    delivery, attempts = await delivery_state(session_factory, delivery_id)
    assert delivery.attempts == 1
    assert len(attempts) == 1


async def _requeued(context: DeliveryContext) -> bool:
    return await requeue_due_deliveries(context) > 0


@pytest.mark.parametrize("parked_by", ["claim", "unclaim"])
async def test_delivery_parked_as_breaker_opens(
    settings: Settings,
    session_factory: SessionFactory,
    monkeypatch: pytest.MonkeyPatch,
    parked_by: str,
) -> None:
    # The parking time is computed for a full gate. Then an attempt of the same webhook
    # fails and pauses it before the statement that parks the delivery runs, so the
    # repark that follows the pause cannot find the delivery in the gate yet.
    settings = settings.model_copy(
        update={
            "WEBHOOK_CONCURRENCY_PER_WEBHOOK": 1,
            "WEBHOOK_BREAKER_FAILURES": 1,
            "WEBHOOK_BREAKER_OPEN_S": 5.0,
        }
    )
    receiver = WebhookReceiver([200])
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(settings, session_factory) as context,
    ):
        [delivery_id] = await record_many(session_factory, f"{base_url}/hook", 1)
        delivery, _ = await delivery_state(session_factory, delivery_id)
        webhook_id = delivery.webhook_id
        gates = context.gates
        claim, unclaim = repository.claim, repository.unclaim

        def fail_running_attempt() -> None:
            assert gates.release(webhook_id, Health.FAILING) is BreakerChange.OPENED

        async def claim_as_gate_changes(*args: Any, **kwargs: Any) -> Any:
            if parked_by == "claim":
                fail_running_attempt()
            else:
                # Another job takes the last slot while this claim is on its way.
                assert gates.acquire(webhook_id)
            return await claim(*args, **kwargs)

        async def unclaim_as_breaker_opens(*args: Any, **kwargs: Any) -> Any:
            fail_running_attempt()
            return await unclaim(*args, **kwargs)

        monkeypatch.setattr(repository, "claim", claim_as_gate_changes)
        monkeypatch.setattr(repository, "unclaim", unclaim_as_breaker_opens)
        if parked_by == "claim":
            # An attempt of another delivery has taken the only slot.
            assert gates.acquire(webhook_id)

        assert await attempt_delivery(context, delivery_id) == PARKED
        probe_in_s = gates.probe_in_s(webhook_id)
        probe_at = datetime.now(UTC) + timedelta(seconds=probe_in_s or 0)
        parked = gates.parked_deliveries(webhook_id)
        # Read before the worker stops, because stopping releases parked deliveries.
        delivery, attempts = await delivery_state(session_factory, delivery_id)

    assert probe_in_s is not None
    assert delivery.status == "pending"
    assert delivery.attempts == 0
    assert attempts == []
    assert delivery.next_attempt_at is not None
    shown_gap_s = (probe_at - delivery.next_attempt_at).total_seconds()
    assert abs(shown_gap_s) < 0.5
    # The probe claims the delivery with the token that the gate keeps for it.
    assert parked == {delivery_id: delivery.next_attempt_at}
    assert receiver.requests == []


async def test_probe_timer_early_by_gate_clock(
    settings: Settings, session_factory: SessionFactory
) -> None:
    # uvloop fires timers by a millisecond clock that can run ahead of time.monotonic(),
    # the gates' clock. A gate clock 1 % slow makes every probe timer fire early.
    open_s = 0.5
    settings = settings.model_copy(
        update={
            "WEBHOOK_CONCURRENCY_PER_WEBHOOK": 1,
            "WEBHOOK_BREAKER_FAILURES": 1,
            "WEBHOOK_BREAKER_OPEN_S": open_s,
            # No retry comes within the test to start a probe in place of the timer.
            "WEBHOOK_RETRY_BASE_DELAY_S": 60.0,
        }
    )
    started = time.monotonic()
    receiver = WebhookReceiver([500])
    async with (
        serve_app(receiver) as base_url,
        delivery_worker(settings, session_factory) as context,
    ):
        context.gates = WebhookGates(
            max_in_flight=1,
            breaker_failures=1,
            breaker_open_s=open_s,
            clock=lambda: started + (time.monotonic() - started) * 0.99,
        )
        delivery_ids = await record_many(session_factory, f"{base_url}/hook", 3)
        await queue_deliveries(context.redis, context.keys, delivery_ids)
        with contextlib.suppress(TimeoutError):
            await receiver.wait_for(3, timeout_s=4 * open_s)

    times = [arrived for _, _, arrived in receiver.requests]
    assert len(times) == 3
    assert times[1] - times[0] >= open_s * 0.99
    assert times[2] - times[1] >= open_s * 0.99
