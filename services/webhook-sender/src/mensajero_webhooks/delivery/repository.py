"""SQL of the delivery worker."""

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common.webhooks import AttemptResult


@dataclass(frozen=True)
class ClaimedDelivery:
    delivery_id: uuid.UUID
    webhook_id: uuid.UUID
    user_id: uuid.UUID
    attempt_number: int
    url: str
    secret: str
    webhook_active: bool
    event_id: uuid.UUID
    event: str
    body: str
    message_id: uuid.UUID | None


_CLAIM = text(
    """
    UPDATE webhookdelivery AS d
    SET attempts = d.attempts + 1,
        next_attempt_at = now() + make_interval(secs => :lease_s),
        updated_at = now()
    FROM webhookconfig AS w, webhookevent AS e
    WHERE d.id = :delivery_id
      AND d.status = 'pending'
      AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now())
      AND w.id = d.webhook_id
      AND e.id = d.event_id
    RETURNING d.id, d.webhook_id, d.user_id, d.attempts, w.url, w.secret_key, w.is_active,
              e.id, e.event, e.body, e.message_id
    """
)


async def claim(
    session: AsyncSession, delivery_id: uuid.UUID, lease_s: float
) -> ClaimedDelivery | None:
    """Take the next attempt of a due, pending delivery, or return None.

    The attempt holds a lease: until it ends, `next_attempt_at` lies in the future, so the
    sweep and a duplicate job cannot start the same attempt twice. A worker that dies
    mid-attempt leaves the lease to expire, and the sweep queues the delivery again.
    """
    row = (
        await session.execute(_CLAIM, {"delivery_id": delivery_id, "lease_s": lease_s})
    ).first()
    if row is None:
        return None
    return ClaimedDelivery(*row)


async def record_attempt(
    session: AsyncSession,
    claimed: ClaimedDelivery,
    result: AttemptResult,
    *,
    status: str,
    next_retry_at: datetime | None,
) -> None:
    """Store one attempt and the delivery's new state."""
    started_at = datetime.fromtimestamp(result.started_at).astimezone()
    await session.execute(
        text(
            """
            INSERT INTO webhookattempt
                (delivery_id, attempt_number, started_at, duration_ms, status_code, error, next_retry_at)
            VALUES (:delivery_id, :attempt_number, :started_at, :duration_ms, :status_code, :error, :next_retry_at)
            """
        ),
        {
            "delivery_id": claimed.delivery_id,
            "attempt_number": claimed.attempt_number,
            "started_at": started_at,
            "duration_ms": result.duration_ms,
            "status_code": result.status_code,
            "error": result.error,
            "next_retry_at": next_retry_at,
        },
    )
    await session.execute(
        text(
            """
            UPDATE webhookdelivery
            SET status = :status,
                next_attempt_at = :next_retry_at,
                last_status_code = :status_code,
                last_error = :error,
                completed_at = CASE WHEN CAST(:status AS varchar) = 'pending' THEN NULL ELSE now() END,
                updated_at = now()
            WHERE id = :delivery_id
            """
        ),
        {
            "delivery_id": claimed.delivery_id,
            "status": status,
            "next_retry_at": next_retry_at,
            "status_code": result.status_code,
            "error": result.error,
        },
    )


async def mark_message_notified(session: AsyncSession, message_id: uuid.UUID) -> None:
    await session.execute(
        text(
            "UPDATE smsmessage SET webhook_sent = true WHERE id = :message_id AND NOT webhook_sent"
        ),
        {"message_id": message_id},
    )


async def cancel(session: AsyncSession, delivery_id: uuid.UUID, reason: str) -> None:
    await session.execute(
        text(
            """
            UPDATE webhookdelivery
            SET status = 'cancelled', last_error = :reason, next_attempt_at = NULL,
                completed_at = now(), updated_at = now()
            WHERE id = :delivery_id AND status = 'pending'
            """
        ),
        {"delivery_id": delivery_id, "reason": reason},
    )


async def disable_webhook(session: AsyncSession, webhook_id: uuid.UUID) -> None:
    """Deactivate a webhook and cancel its other pending deliveries."""
    await session.execute(
        text(
            "UPDATE webhookconfig SET is_active = false, updated_at = now() WHERE id = :webhook_id"
        ),
        {"webhook_id": webhook_id},
    )
    await session.execute(
        text(
            """
            UPDATE webhookdelivery
            SET status = 'cancelled', last_error = 'webhook_disabled', next_attempt_at = NULL,
                completed_at = now(), updated_at = now()
            WHERE webhook_id = :webhook_id AND status = 'pending'
            """
        ),
        {"webhook_id": webhook_id},
    )


async def due_delivery_ids(session: AsyncSession, limit: int) -> list[uuid.UUID]:
    """Return pending deliveries whose next attempt is due, oldest first."""
    rows = await session.execute(
        text(
            """
            SELECT id FROM webhookdelivery
            WHERE status = 'pending' AND next_attempt_at <= now()
            ORDER BY next_attempt_at
            LIMIT :limit
            """
        ),
        {"limit": limit},
    )
    return [row[0] for row in rows]


async def attempt_counts(
    session: AsyncSession, delivery_ids: list[uuid.UUID]
) -> dict[uuid.UUID, int]:
    if not delivery_ids:
        return {}
    rows = await session.execute(
        text("SELECT id, attempts FROM webhookdelivery WHERE id = ANY(:ids)"),
        {"ids": delivery_ids},
    )
    return {row[0]: row[1] for row in rows}
