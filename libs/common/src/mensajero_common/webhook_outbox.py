"""Recording webhook events in the transaction that causes them, and queueing their delivery.

A service records the event inside its own transaction (the outbox); after the commit it
queues one arq job per delivery. If Redis or the webhook-sender is down at that moment, the
webhook-sender's sweep finds the pending deliveries in Postgres and sends them later.
"""

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common import jsonutil
from mensajero_common.keys import RedisKeys

DELIVERY_JOB = "webhook_delivery.send"

# The webhooks are locked FOR KEY SHARE, as the deliveries' foreign key check would lock
# them. A webhook that a concurrent transaction is deleting is waited for and then
# skipped once that delete commits. Without the lock the statement would read it, insert
# its delivery, and fail on the foreign key, losing the caller's whole transaction.
_RECORD_EVENT = text(
    """
    WITH hooks AS (
        SELECT id FROM webhookconfig
        WHERE user_id = :user_id AND is_active AND CAST(:event AS varchar) = ANY(events)
        FOR KEY SHARE
    ),
    inserted AS (
        INSERT INTO webhookevent (id, user_id, message_id, event, body)
        SELECT :event_id, :user_id, :message_id, :event, :body
        WHERE EXISTS (SELECT 1 FROM hooks)
        ON CONFLICT (message_id, event) WHERE message_id IS NOT NULL DO NOTHING
        RETURNING id
    )
    INSERT INTO webhookdelivery (id, event_id, webhook_id, user_id, next_attempt_at)
    SELECT gen_random_uuid(), inserted.id, hooks.id, :user_id, now()
    FROM inserted CROSS JOIN hooks
    RETURNING id
    """
)


def _isoformat(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def build_event_body(
    *,
    event: str,
    event_id: uuid.UUID,
    message_id: uuid.UUID | None,
    from_number: str | None,
    to_number: str | None,
    body: str,
    timestamp: datetime,
    device_id: uuid.UUID | None,
    status: str | None = None,
    error: str | None = None,
    segments: int | None = None,
) -> bytes:
    """Return the JSON body of an event, the same shape for every event type."""
    payload: dict[str, Any] = {
        "event": event,
        "event_id": str(event_id),
        "message_id": str(message_id) if message_id else None,
        "from": from_number,
        "to": to_number,
        "body": body,
        "timestamp": _isoformat(timestamp),
        "device_id": str(device_id) if device_id else None,
    }
    if status is not None:
        payload["status"] = status
    if error is not None:
        payload["error"] = error
    if segments is not None:
        payload["segments"] = segments
    return jsonutil.dumps(payload)


async def record_message_event(
    session: AsyncSession,
    *,
    event: str,
    user_id: uuid.UUID,
    message_id: uuid.UUID,
    from_number: str | None,
    to_number: str | None,
    body: str,
    timestamp: datetime,
    device_id: uuid.UUID | None,
    status: str | None = None,
    error: str | None = None,
    segments: int | None = None,
) -> list[uuid.UUID]:
    """Record `event` of a message for every active webhook of the user subscribed to it.

    Returns the new delivery ids to queue after the commit: none when no webhook wants the
    event or when the event of this message was recorded before.
    """
    event_id = uuid.uuid4()
    event_body = build_event_body(
        event=event,
        event_id=event_id,
        message_id=message_id,
        from_number=from_number,
        to_number=to_number,
        body=body,
        timestamp=timestamp,
        device_id=device_id,
        status=status,
        error=error,
        segments=segments,
    )
    result = await session.execute(
        _RECORD_EVENT,
        {
            "event_id": event_id,
            "user_id": user_id,
            "message_id": message_id,
            "event": event,
            "body": event_body.decode(),
        },
    )
    return [row[0] for row in result.all()]


def delivery_job_id(
    keys: RedisKeys, delivery_id: uuid.UUID | str, attempt_number: int
) -> str:
    """Return the arq job id of one attempt, so a delivery never has two queued jobs per attempt.

    arq keeps a job under "arq:job:<id>" whatever its queue, so the id starts with the key
    prefix to keep installs (and test runs) that share a Redis server apart.
    """
    return f"{keys.prefix}:webhook-delivery:{delivery_id}:{attempt_number}"


async def queue_deliveries(
    redis: ArqRedis,
    keys: RedisKeys,
    delivery_ids: Iterable[uuid.UUID],
    *,
    attempt_number: int = 1,
) -> None:
    """Queue the first attempt of each delivery on the webhook-sender's arq queue."""
    for delivery_id in delivery_ids:
        await redis.enqueue_job(
            DELIVERY_JOB,
            str(delivery_id),
            _job_id=delivery_job_id(keys, delivery_id, attempt_number),
            _queue_name=keys.arq_queue,
        )
