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


@dataclass(frozen=True)
class ParkedDelivery:
    """A due delivery left unclaimed because its webhook's gate was closed."""

    delivery_id: uuid.UUID
    webhook_id: uuid.UUID
    # The delivery's new `next_attempt_at`, returned only to the process that parked it.
    # That process claims the delivery with it before that time, and the sweep after it.
    parked_until: datetime


# A delivery can be claimed when it is due, or with its parking token. Both UPDATEs repeat
# the conditions on `d` because Postgres re-checks only those after waiting for a row lock
# that a concurrent claim holds, and never the ones of `target`.
_CLAIM = text(
    """
    WITH target AS (
        SELECT d.id, d.webhook_id FROM webhookdelivery AS d
        WHERE d.id = :delivery_id
          AND d.status = 'pending'
          AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now()
               OR d.next_attempt_at = :parked_until)
    ),
    claimed AS (
        UPDATE webhookdelivery AS d
        SET attempts = d.attempts + 1,
            next_attempt_at = now() + make_interval(secs => :lease_s),
            updated_at = now()
        FROM target, webhookconfig AS w, webhookevent AS e
        WHERE d.id = target.id
          AND NOT target.webhook_id = ANY(CAST(:blocked AS uuid[]))
          AND d.status = 'pending'
          AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now()
               OR d.next_attempt_at = :parked_until)
          AND w.id = d.webhook_id
          AND e.id = d.event_id
        RETURNING d.id, d.webhook_id, d.user_id, d.attempts, w.url, w.secret_key,
                  w.is_active, e.id AS event_id, e.event, e.body, e.message_id
    ),
    parked AS (
        UPDATE webhookdelivery AS d
        SET next_attempt_at = now() + make_interval(secs => :park_s),
            updated_at = now()
        FROM target
        WHERE d.id = target.id
          AND target.webhook_id = ANY(CAST(:blocked AS uuid[]))
          AND d.status = 'pending'
          AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now()
               OR d.next_attempt_at = :parked_until)
        RETURNING d.webhook_id, d.next_attempt_at
    )
    SELECT claimed.id, claimed.webhook_id, claimed.user_id, claimed.attempts, claimed.url,
           claimed.secret_key, claimed.is_active, claimed.event_id, claimed.event,
           claimed.body, claimed.message_id,
           parked.webhook_id AS parked_webhook_id, parked.next_attempt_at AS parked_until
    FROM (SELECT 1) AS one
    LEFT JOIN claimed ON true
    LEFT JOIN parked ON true
    """
)


async def claim(
    session: AsyncSession,
    delivery_id: uuid.UUID,
    *,
    lease_s: float,
    blocked: list[uuid.UUID],
    park_s: float,
    parked_until: datetime | None = None,
) -> ClaimedDelivery | ParkedDelivery | None:
    """Take the next attempt of a pending delivery, or park it, or return None.

    The delivery must be due, or still carry the `parked_until` of its parking. If its
    webhook is in `blocked`, it is parked for `park_s` instead: nothing is attempted and its
    attempt count stays. A claimed attempt holds a lease: until it ends, `next_attempt_at`
    lies in the future, so the sweep and a duplicate job cannot start the same attempt
    twice. A worker that dies mid-attempt, or with deliveries parked, leaves the lease or
    the parking to expire, and the sweep queues the delivery again.
    """
    row = (
        await session.execute(
            _CLAIM,
            {
                "delivery_id": delivery_id,
                "lease_s": lease_s,
                "blocked": blocked,
                "park_s": park_s,
                "parked_until": parked_until,
            },
        )
    ).one()
    if row.id is not None:
        return ClaimedDelivery(*row[:11])
    if row.parked_webhook_id is not None:
        return ParkedDelivery(delivery_id, row.parked_webhook_id, row.parked_until)
    return None


async def unclaim(
    session: AsyncSession, claimed: ClaimedDelivery, park_s: float
) -> ParkedDelivery | None:
    """Undo a claim whose attempt did not start, and park the delivery instead."""
    row = (
        await session.execute(
            text(
                """
                UPDATE webhookdelivery
                SET attempts = attempts - 1,
                    next_attempt_at = now() + make_interval(secs => :park_s),
                    updated_at = now()
                WHERE id = :delivery_id AND status = 'pending' AND attempts = :attempts
                RETURNING next_attempt_at
                """
            ),
            {
                "delivery_id": claimed.delivery_id,
                "attempts": claimed.attempt_number,
                "park_s": park_s,
            },
        )
    ).first()
    if row is None:
        return None
    return ParkedDelivery(claimed.delivery_id, claimed.webhook_id, row[0])


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
