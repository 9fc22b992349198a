"""arq jobs of the webhook-sender: `webhook_delivery.send` and `webhook_delivery.sweep`."""

import uuid
from typing import Any

from arq.worker import func

from mensajero_common.metrics import JOB_DURATION
from mensajero_common.webhook_outbox import DELIVERY_JOB
from mensajero_webhooks.delivery.service import (
    DeliveryContext,
    attempt_delivery,
    requeue_due_deliveries,
)

SWEEP_JOB = "webhook_delivery.sweep"


async def send(ctx: dict[str, Any], delivery_id: str) -> str:
    context: DeliveryContext = ctx["delivery"]
    with JOB_DURATION.labels(DELIVERY_JOB).time():
        return await attempt_delivery(context, uuid.UUID(delivery_id))


async def sweep(ctx: dict[str, Any]) -> int:
    context: DeliveryContext = ctx["delivery"]
    with JOB_DURATION.labels(SWEEP_JOB).time():
        return await requeue_due_deliveries(context)


def job_functions(timeout_s: float, sweep_timeout_s: float) -> list[Any]:
    """Return the jobs; `timeout_s` must cover two attempts, because a delivery job goes on
    with the deliveries parked behind its webhook for up to WEBHOOK_TIMEOUT_S."""
    # arq retries a job that raised; an attempt records its own failure and schedules its
    # own retry, so arq must not run it again.
    return [
        func(send, name=DELIVERY_JOB, max_tries=1, timeout=timeout_s),
        func(sweep, name=SWEEP_JOB, max_tries=1, timeout=sweep_timeout_s),
    ]
