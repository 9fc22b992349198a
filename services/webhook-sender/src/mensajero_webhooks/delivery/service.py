"""One delivery attempt: claim it, POST it, record it, and schedule the retry."""

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import aiohttp
import structlog
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from mensajero_common.db import session_scope
from mensajero_common.keys import RedisKeys
from mensajero_common.metrics import WEBHOOK_ATTEMPTS
from mensajero_common.models import WebhookDeliveryStatus
from mensajero_common.settings import Settings
from mensajero_common.transient import is_transient
from mensajero_common.webhook_outbox import DELIVERY_JOB, delivery_job_id
from mensajero_common.webhooks import DISABLED_GONE, AttemptResult
from mensajero_webhooks.delivery import repository
from mensajero_webhooks.delivery.backoff import RetryBackoff
from mensajero_webhooks.delivery.gates import BreakerChange, Health, WebhookGates
from mensajero_webhooks.delivery.http_client import post_event
from mensajero_webhooks.delivery.repository import ClaimedDelivery, ParkedDelivery

logger = structlog.get_logger(__name__)


def _debug_enabled() -> bool:
    # Per-delivery lines are DEBUG. Checking the level first skips binding a logger and
    # formatting its fields for a line that LOG_LEVEL would drop.
    return logging.getLogger(__name__).isEnabledFor(logging.DEBUG)


# Extra time an attempt's lease lasts beyond the HTTP timeout, for the database writes.
LEASE_MARGIN_S = 30.0
HTTP_GONE = 410
HTTP_TOO_MANY_REQUESTS = 429
# Status that `attempt_delivery` returns for a delivery left waiting for its webhook's gate.
PARKED = "parked"


@dataclass
class DeliveryContext:
    settings: Settings
    keys: RedisKeys
    # Each attempt's claim and record run on the engine's asyncpg connections directly,
    # and the rarer writes and the sweep in sessions.
    engine: AsyncEngine
    session_factory: async_sessionmaker[AsyncSession]
    redis: ArqRedis
    http: aiohttp.ClientSession
    gates: WebhookGates = field(init=False)
    # Tasks that run parked deliveries outside arq's jobs, and the timers that start them
    # when a paused webhook may be probed again.
    drain_tasks: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    reopen_timers: dict[uuid.UUID, asyncio.TimerHandle] = field(
        init=False, default_factory=dict
    )
    # Claims of this process whose POST has not started, by delivery id. Those still
    # here once every job and drain task has ended were cut off before their POST, so
    # `close` releases them.
    unposted: dict[uuid.UUID, ClaimedDelivery] = field(init=False, default_factory=dict)
    # Set by `begin_close`. From then on no parked delivery is started, and drain tasks
    # waiting to retry end at once.
    close_requested: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    # Paces the drain tasks' retries after Postgres or Redis failed.
    backoff: RetryBackoff = field(init=False, default_factory=RetryBackoff)
    # Releases the parked deliveries while arq waits for the running jobs after SIGTERM.
    release_task: asyncio.Task[None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.gates = WebhookGates(
            max_in_flight=self.settings.WEBHOOK_CONCURRENCY_PER_WEBHOOK,
            breaker_failures=self.settings.WEBHOOK_BREAKER_FAILURES,
            breaker_open_s=self.settings.WEBHOOK_BREAKER_OPEN_S,
        )

    @property
    def closing(self) -> bool:
        return self.close_requested.is_set()

    @property
    def lease_s(self) -> float:
        return self.settings.WEBHOOK_TIMEOUT_S + LEASE_MARGIN_S

    @property
    def park_s(self) -> float:
        """Time a delivery parked behind full slots stays with this process before the
        sweep may take it."""
        return self.lease_s + self.settings.WEBHOOK_BREAKER_OPEN_S

    def parking_for(self, webhook_id: uuid.UUID) -> tuple[float, bool]:
        """Return how long a delivery of this blocked webhook stays parked, and whether
        that is when it will be attempted.

        A paused webhook is attempted when its probe is due, and the deliveries parked
        behind a running probe right after it, within WEBHOOK_TIMEOUT_S. Behind full
        slots the wait is unknown, so the parking lasts `park_s`.

        NOTE: parked deliveries are due from the probe time until the probe starts and
        moves them on, so a sweep in that moment can queue them for another process,
        whose own breaker is closed.
        """
        probe_in_s = self.gates.probe_in_s(webhook_id)
        if probe_in_s is not None:
            return probe_in_s, True
        if self.gates.is_probing(webhook_id):
            return self.settings.WEBHOOK_TIMEOUT_S, True
        return self.park_s, False

    def begin_close(self) -> None:
        """Stop starting parked deliveries, and start releasing them to any sender.

        The worker calls it on SIGTERM, so that the parked deliveries do not wait for the
        jobs that arq lets finish first.
        """
        if self.closing:
            return
        self.close_requested.set()
        for timer in self.reopen_timers.values():
            timer.cancel()
        self.reopen_timers.clear()
        self.release_task = asyncio.create_task(release_held(self, with_claims=False))

    async def close(self, wait_s: float) -> None:
        """Release what this process holds and has not attempted, waiting up to `wait_s`
        for the attempts that drain tasks have in flight.

        Call it once arq's jobs have ended. An attempt cut off during its POST keeps its
        lease, because the endpoint may have received it, and the sweep queues it again
        once the lease has run out.
        """
        self.begin_close()
        if self.release_task is not None:
            await self.release_task
        if self.drain_tasks:
            _, running = await asyncio.wait(self.drain_tasks, timeout=wait_s)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        # Deliveries that jobs parked after SIGTERM, and claims that a cancellation cut
        # off before their POST: no task of this process will take them any more.
        await release_held(self, with_claims=True)


def released_job_id(
    keys: RedisKeys, delivery_id: uuid.UUID, attempt_number: int
) -> str:
    """Return the job id of an attempt released at shutdown.

    It differs from `delivery_job_id` because the job of the same attempt may still be in
    the queue. arq leaves a job that it cancelled at shutdown there and, with max_tries 1,
    never runs it again, so queueing that id again would queue nothing.
    """
    return f"{delivery_job_id(keys, delivery_id, attempt_number)}:released"


async def release_held(context: DeliveryContext, *, with_claims: bool) -> None:
    """Make the parked deliveries due now and queue them, and with `with_claims` the
    claims whose POST never started too, so that any sender takes them at once.

    Pass `with_claims` only once no job or drain task runs, since until then the holder
    of a claim may still start its POST. On a failure, the deliveries wait for their
    parking or lease to run out and for the sweep, as after a crash.
    """
    parked = context.gates.take_all_parked()
    claims = list(context.unposted.values()) if with_claims else []
    if with_claims:
        context.unposted.clear()
    if not parked and not claims:
        return

    try:
        async with repository.pooled_connection(context.engine) as connection:
            released = await repository.release_parked(connection, parked)
            released.update(await repository.release_claims(connection, claims))
        # The deliveries are due from here on, so the sweep queues any that this loop
        # does not.
        for delivery_id, attempts in released.items():
            await context.redis.enqueue_job(
                DELIVERY_JOB,
                str(delivery_id),
                _job_id=released_job_id(context.keys, delivery_id, attempts + 1),
                _queue_name=context.keys.arq_queue,
            )
    except Exception as error:
        if not is_transient(error):
            logger.exception(
                "releasing deliveries failed", parked=len(parked), claims=len(claims)
            )
            return
        logger.warning(
            "releasing deliveries failed",
            parked=len(parked),
            claims=len(claims),
            error=repr(error),
        )
        return
    logger.info(
        "deliveries released",
        parked=len(parked),
        claims=len(claims),
        released=len(released),
    )


def retry_delay_s(settings: Settings, attempt_number: int) -> float:
    """Return the wait after failed attempt `attempt_number`: base × 2^(n-1), ±20 % jitter."""
    delay = settings.WEBHOOK_RETRY_BASE_DELAY_S * 2 ** (attempt_number - 1)
    return delay * random.uniform(0.8, 1.2)


def _outcome(
    settings: Settings, attempt_number: int, result: AttemptResult
) -> tuple[str, datetime | None]:
    """Decide the delivery's status after an attempt, and when to retry if it does."""
    if result.succeeded:
        return WebhookDeliveryStatus.SUCCEEDED, None
    if result.status_code == HTTP_GONE or result.error in (
        "private_address",
        "https_required",
    ):
        return WebhookDeliveryStatus.FAILED, None
    if attempt_number >= settings.WEBHOOK_MAX_ATTEMPTS:
        return WebhookDeliveryStatus.FAILED, None
    next_retry_at = datetime.now(UTC) + timedelta(
        seconds=retry_delay_s(settings, attempt_number)
    )
    return WebhookDeliveryStatus.PENDING, next_retry_at


def endpoint_health(result: AttemptResult) -> Health:
    if result.status_code is not None:
        if result.status_code == HTTP_TOO_MANY_REQUESTS or result.status_code >= 500:
            return Health.FAILING
        return Health.RESPONSIVE
    if result.error == "timeout" or (result.error or "").startswith("connection_error"):
        return Health.FAILING
    return Health.UNKNOWN


async def attempt_delivery(context: DeliveryContext, delivery_id: uuid.UUID) -> str:
    """Run the next attempt of a delivery if it is due, or park it; return what happened.

    Then, until WEBHOOK_TIMEOUT_S has passed, the job goes on with the deliveries parked
    behind the same webhook, so that a freed slot is used without a trip through Redis.
    If an attempt raises, drain tasks take those parked deliveries over before the
    error propagates.
    """
    deadline = time.monotonic() + context.settings.WEBHOOK_TIMEOUT_S
    claim_result = await _claim(context, delivery_id, None)
    if claim_result is None:
        return "not_due"

    webhook_id = claim_result.webhook_id
    try:
        if isinstance(claim_result, ParkedDelivery):
            status = PARKED
        else:
            status = await _attempt(context, claim_result)
        await drain_parked(context, webhook_id, deadline)
    except BaseException as error:
        # A cancelled job hands them over too, unless the worker is stopping.
        _hand_parked_to_drainers(context, webhook_id, error)
        raise
    context.backoff.record_success()
    return status


def _hand_parked_to_drainers(
    context: DeliveryContext, webhook_id: uuid.UUID, error: BaseException
) -> None:
    """Start drain tasks for the webhook's parked deliveries after a job's attempt raised.

    Without them, the parked deliveries would wait until a later job of the webhook
    drains them, or until their parking runs out (`park_s`) and the sweep queues them
    again. After a transient failure the drain tasks wait for the process's backoff
    before their first claim.
    """
    if is_transient(error):
        retry_in_s = context.backoff.record_failure()
    else:
        retry_in_s = context.backoff.wait_s()
    if context.gates.parked_count(webhook_id) and not context.closing:
        logger.warning(
            "delivery attempt failed, parked deliveries handed to drain tasks",
            webhook_id=str(webhook_id),
            parked=context.gates.parked_count(webhook_id),
            retry_in_s=round(retry_in_s, 1),
            error=repr(error),
        )
    start_drainers(context, webhook_id)


async def _claim(
    context: DeliveryContext,
    delivery_id: uuid.UUID,
    parked_until: datetime | None,
    *,
    slot_held: bool = False,
) -> ClaimedDelivery | ParkedDelivery | None:
    """Claim a delivery and take its webhook's slot, or park it if the gate is closed.

    With `slot_held`, the caller has already taken a slot of the delivery's webhook.
    """
    gates = context.gates
    blocked: dict[uuid.UUID, float] = {}
    paused: list[uuid.UUID] = []
    # The gate states that the parking times were computed from.
    pause_states: dict[uuid.UUID, tuple[float | None, bool]] = {}
    for webhook_id in [] if slot_held else gates.blocked():
        blocked[webhook_id], exact = context.parking_for(webhook_id)
        pause_states[webhook_id] = gates.pause_state(webhook_id)
        if exact:
            paused.append(webhook_id)
    async with repository.pooled_connection(context.engine) as connection:
        claim_result = await repository.claim(
            connection,
            delivery_id,
            lease_s=context.lease_s,
            blocked=blocked,
            paused=paused,
            parked_until=parked_until,
        )
        # Recorded before leaving the block, whose exit awaits and can be cancelled.
        if isinstance(claim_result, ClaimedDelivery):
            context.unposted[claim_result.delivery_id] = claim_result
    # Other jobs may have taken the last slots while the claim was on its way.
    if (
        isinstance(claim_result, ClaimedDelivery)
        and not slot_held
        and not gates.acquire(claim_result.webhook_id)
    ):
        claimed = claim_result
        park_s, exact = context.parking_for(claimed.webhook_id)
        pause_states[claimed.webhook_id] = gates.pause_state(claimed.webhook_id)
        try:
            async with repository.pooled_connection(context.engine) as connection:
                claim_result = await repository.unclaim(
                    connection, claimed, park_s, paused=exact
                )
        except Exception:
            context.unposted.pop(claimed.delivery_id, None)
            raise
        context.unposted.pop(claimed.delivery_id, None)
    if isinstance(claim_result, ParkedDelivery):
        gates.park(
            claim_result.webhook_id, claim_result.delivery_id, claim_result.parked_until
        )
        if _debug_enabled():
            logger.debug(
                "delivery parked",
                delivery_id=str(delivery_id),
                webhook_id=str(claim_result.webhook_id),
            )
        if gates.pause_state(claim_result.webhook_id) != pause_states.get(
            claim_result.webhook_id
        ):
            await _repark_missed(context, claim_result)
    return claim_result


async def _repark_missed(context: DeliveryContext, parked: ParkedDelivery) -> None:
    """Move a delivery that the `_repark` of its breaker's opening or probe missed.

    The breaker changed while the statement that parked the delivery ran, so that
    `_repark` did not find the delivery in the gate. Without this move, the delivery log
    would show the old time as the next attempt, for example `park_s` (the attempt
    lease plus the pause) for a delivery that is attempted at the probe.
    """
    park_s, exact = context.parking_for(parked.webhook_id)
    if not exact:
        # The breaker closed or its probe is due, so no time is known for the next
        # attempt, and the parking time stays.
        return
    await _repark(context, parked.webhook_id, park_s, [parked.delivery_id])


async def drain_parked(
    context: DeliveryContext, webhook_id: uuid.UUID, deadline: float
) -> int:
    """Attempt the webhook's parked deliveries while its gate admits them and time is left,
    and return how many claims reached Postgres.

    Work left when the deadline passes goes to a drain task of this process.
    """
    gates = context.gates
    claims = 0
    while time.monotonic() < deadline and not context.closing:
        parked = gates.take_parked(webhook_id)
        if parked is None:
            break
        delivery_id, parked_until = parked
        try:
            claim_result = await _claim(
                context, delivery_id, parked_until, slot_held=True
            )
        except BaseException:
            gates.release(webhook_id, Health.UNKNOWN)
            # Parked again, so that shutdown releases it. If the claim went through
            # after all, its token no longer matches and releasing it changes nothing.
            gates.park(webhook_id, delivery_id, parked_until)
            raise
        claims += 1
        if isinstance(claim_result, ClaimedDelivery):
            await _attempt(context, claim_result)
        else:
            # The sweep handed the delivery to another job after its parking expired.
            gates.release(webhook_id, Health.UNKNOWN)
    start_drainers(context, webhook_id)
    return claims


def start_drainers(context: DeliveryContext, webhook_id: uuid.UUID) -> None:
    """Start drain tasks for parked deliveries that the gate admits and no job will take."""
    gates = context.gates
    while not context.closing and gates.wants_drainer(webhook_id):
        gates.drainer_started(webhook_id)
        task = asyncio.create_task(_drain_task(context, webhook_id))
        context.drain_tasks.add(task)
        task.add_done_callback(context.drain_tasks.discard)


async def _drain_task(context: DeliveryContext, webhook_id: uuid.UUID) -> None:
    """Drain the webhook's parked deliveries, retrying after each transient failure once
    the process's backoff allows it.

    A delivery whose claim failed is parked again with its token, so the retry claims it
    with that token, and no other process can claim it until its parking runs out. One
    whose attempt failed after its claim keeps its lease, as any failed attempt does.
    """
    try:
        while await _backoff_waited(context):
            try:
                claims = await drain_parked(context, webhook_id, math.inf)
            except Exception as error:
                if not is_transient(error):
                    # The parked deliveries stay pending in Postgres, and the sweep
                    # queues them again once their parking runs out.
                    logger.exception(
                        "draining parked deliveries failed", webhook_id=str(webhook_id)
                    )
                    return
                retry_in_s = context.backoff.record_failure()
                logger.warning(
                    "draining parked deliveries failed, retrying",
                    webhook_id=str(webhook_id),
                    parked=context.gates.parked_count(webhook_id),
                    retry_in_s=round(retry_in_s, 1),
                    error=repr(error),
                )
                continue
            if claims:
                context.backoff.record_success()
            return
    finally:
        context.gates.drainer_ended(webhook_id)


async def _backoff_waited(context: DeliveryContext) -> bool:
    """Wait until the process's backoff allows a retry; return False if closing began."""
    wait_s = context.backoff.wait_s()
    if wait_s > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(context.close_requested.wait(), wait_s)
    return not context.closing


def _schedule_probe(context: DeliveryContext, webhook_id: uuid.UUID) -> None:
    """Start the parked deliveries again once the paused webhook's probe is due."""
    timer = context.reopen_timers.pop(webhook_id, None)
    if timer is not None:
        timer.cancel()

    probe_in_s = context.gates.probe_in_s(webhook_id)
    if probe_in_s is None:
        start_drainers(context, webhook_id)
        return

    def reopen() -> None:
        context.reopen_timers.pop(webhook_id, None)
        if context.closing:
            return
        # uvloop runs timers on a clock in whole milliseconds, so this one can fire before
        # time.monotonic(), the gates' clock, reaches the probe time. A new timer then
        # waits for the rest, because otherwise no probe would start until a job arrives.
        _schedule_probe(context, webhook_id)

    context.reopen_timers[webhook_id] = asyncio.get_running_loop().call_later(
        probe_in_s, reopen
    )


async def _repark(
    context: DeliveryContext,
    webhook_id: uuid.UUID,
    park_s: float,
    delivery_ids: Collection[uuid.UUID] | None = None,
) -> None:
    """Move the webhook's parked deliveries, or only `delivery_ids` of them, to `park_s`
    seconds from now, so that the delivery log shows when they will be attempted.

    The gate admits none of them meanwhile, because it is paused or probing, so no
    drainer has taken one with its old parking token. On a transient failure the old
    times stay, and the sweep queues those deliveries again once they pass.
    """
    parked = context.gates.parked_deliveries(webhook_id)
    if delivery_ids is not None:
        parked = {
            delivery_id: parked_until
            for delivery_id, parked_until in parked.items()
            if delivery_id in delivery_ids
        }
    if not parked:
        return
    try:
        async with repository.pooled_connection(context.engine) as connection:
            moved = await repository.repark(connection, parked, park_s)
    except Exception as error:
        if not is_transient(error):
            raise
        logger.warning(
            "moving parked deliveries failed",
            webhook_id=str(webhook_id),
            error=repr(error),
        )
        return
    for delivery_id, parked_until in moved.items():
        context.gates.repark(webhook_id, delivery_id, parked_until)


async def _attempt(context: DeliveryContext, claimed: ClaimedDelivery) -> str:
    """Run a claimed attempt, which has taken a slot of its webhook, and give the slot back."""
    health = Health.UNKNOWN
    try:
        if context.gates.is_probing(claimed.webhook_id):
            # This attempt is the probe, and the deliveries parked behind it go right
            # after it.
            await _repark(
                context, claimed.webhook_id, context.settings.WEBHOOK_TIMEOUT_S
            )
        status, health = await _post_and_record(context, claimed)
    except Exception:
        # The claim keeps its lease, as after any failed attempt.
        context.unposted.pop(claimed.delivery_id, None)
        raise
    finally:
        change = context.gates.release(claimed.webhook_id, health)
    if change is BreakerChange.OPENED:
        logger.warning(
            "webhook paused after consecutive failed attempts",
            webhook_id=str(claimed.webhook_id),
            pause_s=context.settings.WEBHOOK_BREAKER_OPEN_S,
        )
        _schedule_probe(context, claimed.webhook_id)
        await _repark(
            context, claimed.webhook_id, context.settings.WEBHOOK_BREAKER_OPEN_S
        )
    elif change is BreakerChange.CLOSED:
        timer = context.reopen_timers.pop(claimed.webhook_id, None)
        if timer is not None:
            timer.cancel()
        logger.info("webhook resumed", webhook_id=str(claimed.webhook_id))
        start_drainers(context, claimed.webhook_id)
    return status


async def _post_and_record(
    context: DeliveryContext, claimed: ClaimedDelivery
) -> tuple[str, Health]:
    settings = context.settings
    delivery_id = claimed.delivery_id
    if not claimed.webhook_active or not claimed.subscribed:
        reason = "webhook_disabled" if not claimed.webhook_active else "unsubscribed"
        log = _delivery_logger(claimed)
        async with session_scope(context.session_factory) as session:
            await repository.cancel(session, delivery_id, reason)
        context.unposted.pop(delivery_id, None)
        log.info("delivery cancelled", reason=reason)
        WEBHOOK_ATTEMPTS.labels("cancelled").inc()
        return WebhookDeliveryStatus.CANCELLED, Health.UNKNOWN

    # From here on the endpoint may receive the POST, so shutdown must not release the
    # claim: it keeps its lease even if the attempt is cancelled.
    context.unposted.pop(delivery_id, None)
    result = await post_event(
        context.http,
        url=claimed.url,
        secret=claimed.secret,
        event_id=str(claimed.event_id),
        body=claimed.body.encode(),
        timeout_s=settings.WEBHOOK_TIMEOUT_S,
        require_https=settings.is_production,
        allow_private=settings.webhook_private_urls_allowed,
    )
    status, next_retry_at = _outcome(settings, claimed.attempt_number, result)
    WEBHOOK_ATTEMPTS.labels("retry" if next_retry_at is not None else str(status)).inc()

    async with repository.pooled_connection(context.engine) as connection:
        await repository.record_attempt(
            connection,
            claimed,
            result,
            status=status,
            next_retry_at=next_retry_at,
            disabled_reason=DISABLED_GONE if result.status_code == HTTP_GONE else None,
        )

    if status == WebhookDeliveryStatus.SUCCEEDED:
        if _debug_enabled():
            _delivery_logger(claimed).debug(
                "delivery succeeded",
                status_code=result.status_code,
                duration_ms=result.duration_ms,
            )
        return status, endpoint_health(result)

    log = _delivery_logger(claimed)
    if result.status_code == HTTP_GONE:
        log.info("webhook disabled because its endpoint responded with 410 Gone")
    if next_retry_at is not None:
        await context.redis.enqueue_job(
            DELIVERY_JOB,
            str(delivery_id),
            _job_id=delivery_job_id(
                context.keys, delivery_id, claimed.attempt_number + 1
            ),
            _queue_name=context.keys.arq_queue,
            _defer_until=next_retry_at,
        )
        log.info(
            "delivery attempt failed, retry scheduled",
            status_code=result.status_code,
            error=result.error,
            next_retry_at=next_retry_at.isoformat(),
        )
    else:
        log.warning(
            "delivery failed", status_code=result.status_code, error=result.error
        )
    return status, endpoint_health(result)


def _delivery_logger(claimed: ClaimedDelivery) -> structlog.stdlib.BoundLogger:
    bound: structlog.stdlib.BoundLogger = logger.bind(
        delivery_id=str(claimed.delivery_id),
        webhook_id=str(claimed.webhook_id),
        attempt=claimed.attempt_number,
    )
    return bound


async def requeue_due_deliveries(context: DeliveryContext, limit: int = 500) -> int:
    """Queue a job for every due pending delivery, whatever happened to its first job.

    Job ids name the delivery and its next attempt, so a delivery whose job is still queued
    is not queued twice, and the lease in `claim` keeps a duplicate from running.
    """
    async with session_scope(context.session_factory) as session:
        due = await repository.due_deliveries(session, limit)
    for delivery_id, attempts in due.items():
        await context.redis.enqueue_job(
            DELIVERY_JOB,
            str(delivery_id),
            _job_id=delivery_job_id(context.keys, delivery_id, attempts + 1),
            _queue_name=context.keys.arq_queue,
        )
    if due:
        logger.info("due deliveries queued by the sweep", count=len(due))
    return len(due)
