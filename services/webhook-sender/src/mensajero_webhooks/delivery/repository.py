"""SQL of the delivery worker."""

import uuid
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from mensajero_common.models import WebhookDeliveryStatus
from mensajero_common.webhooks import AttemptResult


@asynccontextmanager
async def pooled_connection(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """Check out a connection from the engine's pool and yield its asyncpg connection.

    Each statement sent on it commits on its own, unless the caller opens a transaction
    with `connection.transaction()`. The claim and the record of every attempt use it,
    because an ORM session around them cost the sender about a sixth of its CPU per
    delivery.
    """
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver: asyncpg.Connection = raw.driver_connection
        yield driver


@dataclass(frozen=True)
class ClaimedDelivery:
    delivery_id: uuid.UUID
    webhook_id: uuid.UUID
    user_id: uuid.UUID
    attempt_number: int
    url: str
    secret: str
    webhook_active: bool
    # Whether the webhook still subscribes to the event: its owner may have removed the
    # event since the delivery was created.
    subscribed: bool
    event_id: uuid.UUID
    event: str
    body: str
    message_id: uuid.UUID | None
    # The delivery's `next_attempt_at` during this claim's lease, which tells this claim
    # apart from any later one of the same attempt.
    lease_until: datetime


@dataclass(frozen=True)
class ParkedDelivery:
    """A due delivery left unclaimed because its webhook's gate was closed."""

    delivery_id: uuid.UUID
    webhook_id: uuid.UUID
    # The delivery's new `next_attempt_at`, returned only to the process that parked it.
    # That process claims the delivery with it before that time, and the sweep after it.
    parked_until: datetime


# The statements that take a delivery by id test its status on `status || ''`, which
# matches no index. Otherwise, on statistics taken while no delivery was pending, each
# claim read every pending delivery, so an endpoint that went down slowed all claims.
#
# A delivery can be claimed when it is due, or with its parking token ($5). Both UPDATEs
# repeat the conditions on `d` because Postgres re-checks only those after waiting for a
# row lock that a concurrent claim holds, and never the ones of `target`. A parked
# delivery waits the seconds in $4 at the position of its webhook in $3. When the webhook
# is paused ($6), that is when its probe is due, and the latest attempt's
# `next_retry_at` shows the same time. A claim sets the previous attempt's
# `next_retry_at` to the time the next attempt actually starts.
_CLAIM = """
    WITH target AS (
        SELECT d.id, d.webhook_id FROM webhookdelivery AS d
        WHERE d.id = $1
          AND (d.status || '') = 'pending'
          AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now()
               OR d.next_attempt_at = $5)
    ),
    claimed AS (
        UPDATE webhookdelivery AS d
        SET attempts = d.attempts + 1,
            next_attempt_at = now() + make_interval(secs => $2),
            updated_at = now()
        FROM target, webhookconfig AS w, webhookevent AS e
        WHERE d.id = target.id
          AND NOT target.webhook_id = ANY($3::uuid[])
          AND (d.status || '') = 'pending'
          AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now()
               OR d.next_attempt_at = $5)
          AND w.id = d.webhook_id
          AND e.id = d.event_id
        RETURNING d.id, d.webhook_id, d.user_id, d.attempts, w.url, w.secret_key,
                  w.is_active, e.event = ANY(w.events) AS subscribed,
                  e.id AS event_id, e.event, e.body, e.message_id,
                  d.next_attempt_at AS lease_until
    ),
    claimed_previous AS (
        UPDATE webhookattempt AS a
        SET next_retry_at = now()
        FROM claimed
        WHERE a.delivery_id = claimed.id AND a.attempt_number = claimed.attempts - 1
    ),
    parked AS (
        UPDATE webhookdelivery AS d
        SET next_attempt_at = now() + make_interval(
                secs => ($4::float8[])[array_position($3::uuid[], target.webhook_id)]
            ),
            updated_at = now()
        FROM target
        WHERE d.id = target.id
          AND target.webhook_id = ANY($3::uuid[])
          AND (d.status || '') = 'pending'
          AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now()
               OR d.next_attempt_at = $5)
        RETURNING d.id, d.webhook_id, d.attempts, d.next_attempt_at
    ),
    parked_attempt AS (
        UPDATE webhookattempt AS a
        SET next_retry_at = parked.next_attempt_at
        FROM parked
        WHERE a.delivery_id = parked.id
          AND a.attempt_number = parked.attempts
          AND parked.webhook_id = ANY($6::uuid[])
    )
    SELECT claimed.*,
           parked.webhook_id AS parked_webhook_id, parked.next_attempt_at AS parked_until
    FROM (SELECT 1) AS one
    LEFT JOIN claimed ON true
    LEFT JOIN parked ON true
"""


async def claim(
    connection: asyncpg.Connection,
    delivery_id: uuid.UUID,
    *,
    lease_s: float,
    blocked: dict[uuid.UUID, float],
    paused: Collection[uuid.UUID] = (),
    parked_until: datetime | None = None,
) -> ClaimedDelivery | ParkedDelivery | None:
    """Take the next attempt of a pending delivery, or park it, or return None.

    The delivery must be due, or still carry the `parked_until` of its parking. If its
    webhook is a key of `blocked`, it is parked instead for the seconds that `blocked`
    maps it to: nothing is attempted and its attempt count stays. For a webhook in
    `paused`, the latest attempt's `next_retry_at` moves to the same time. A claimed attempt holds a lease: until it ends, `next_attempt_at`
    lies in the future, so the sweep and a duplicate job cannot start the same attempt
    twice. A worker that dies mid-attempt, or with deliveries parked, leaves the lease or
    the parking to expire, and the sweep queues the delivery again. A worker that stops
    on SIGTERM releases its parked deliveries and its claims whose POST never started
    (`release_parked`, `release_claims`).
    """
    # One statement, atomic by itself, so it runs without BEGIN and COMMIT.
    row = await connection.fetchrow(
        _CLAIM,
        delivery_id,
        float(lease_s),
        list(blocked),
        [float(park_s) for park_s in blocked.values()],
        parked_until,
        list(paused),
    )
    assert row is not None
    if row["id"] is not None:
        return ClaimedDelivery(
            delivery_id=row["id"],
            webhook_id=row["webhook_id"],
            user_id=row["user_id"],
            attempt_number=row["attempts"],
            url=row["url"],
            secret=row["secret_key"],
            webhook_active=row["is_active"],
            subscribed=row["subscribed"],
            event_id=row["event_id"],
            event=row["event"],
            body=row["body"],
            message_id=row["message_id"],
            lease_until=row["lease_until"],
        )
    if row["parked_webhook_id"] is not None:
        return ParkedDelivery(
            delivery_id, row["parked_webhook_id"], row["parked_until"]
        )
    return None


async def unclaim(
    connection: asyncpg.Connection,
    claimed: ClaimedDelivery,
    park_s: float,
    *,
    paused: bool = False,
) -> ParkedDelivery | None:
    """Undo a claim whose attempt did not start, and park the delivery instead.

    With `paused`, the latest attempt's `next_retry_at` moves to the parking time too.
    """
    parked_until = await connection.fetchval(
        """
        WITH parked AS (
            UPDATE webhookdelivery
            SET attempts = attempts - 1,
                next_attempt_at = now() + make_interval(secs => $3),
                updated_at = now()
            WHERE id = $1 AND (status || '') = 'pending' AND attempts = $2
            RETURNING id, attempts, next_attempt_at
        ),
        parked_attempt AS (
            UPDATE webhookattempt AS a
            SET next_retry_at = parked.next_attempt_at
            FROM parked
            WHERE $4 AND a.delivery_id = parked.id
              AND a.attempt_number = parked.attempts
        )
        SELECT next_attempt_at FROM parked
        """,
        claimed.delivery_id,
        claimed.attempt_number,
        float(park_s),
        paused,
    )
    if parked_until is None:
        return None
    return ParkedDelivery(claimed.delivery_id, claimed.webhook_id, parked_until)


_REPARK = """
    WITH moved AS (
        UPDATE webhookdelivery AS d
        SET next_attempt_at = now() + make_interval(secs => $3), updated_at = now()
        FROM unnest($1::uuid[], $2::timestamptz[]) AS p(id, token)
        WHERE d.id = p.id AND (d.status || '') = 'pending'
          AND d.next_attempt_at = p.token
        RETURNING d.id, d.attempts, d.next_attempt_at
    ),
    moved_attempt AS (
        UPDATE webhookattempt AS a
        SET next_retry_at = moved.next_attempt_at
        FROM moved
        WHERE a.delivery_id = moved.id AND a.attempt_number = moved.attempts
    )
    SELECT id, attempts, next_attempt_at FROM moved
"""


async def repark(
    connection: asyncpg.Connection,
    parked: dict[uuid.UUID, datetime],
    park_s: float,
) -> dict[uuid.UUID, datetime]:
    """Move parked deliveries (id to parking token) to `park_s` seconds from now, with
    their latest attempt's `next_retry_at`; return the new token of each one moved.

    A delivery whose token changed meanwhile (another process took it over) is left as
    it is.
    """
    if not parked:
        return {}
    rows = await connection.fetch(
        _REPARK, list(parked), list(parked.values()), float(park_s)
    )
    return {row["id"]: row["next_attempt_at"] for row in rows}


async def release_claims(
    connection: asyncpg.Connection, claims: Collection[ClaimedDelivery]
) -> dict[uuid.UUID, int]:
    """Undo claims whose POST never started, so that the deliveries are due at once.

    A claim is undone only while its lease is unchanged, so one that expired and that
    another process took over stays as it is. Returns the attempt count of each delivery
    released.
    """
    if not claims:
        return {}
    rows = await connection.fetch(
        """
        UPDATE webhookdelivery AS d
        SET attempts = d.attempts - 1, next_attempt_at = now(), updated_at = now()
        FROM unnest($1::uuid[], $2::integer[], $3::timestamptz[])
            AS c(id, attempts, lease_until)
        WHERE d.id = c.id AND (d.status || '') = 'pending'
          AND d.attempts = c.attempts AND d.next_attempt_at = c.lease_until
        RETURNING d.id, d.attempts
        """,
        [claim.delivery_id for claim in claims],
        [claim.attempt_number for claim in claims],
        [claim.lease_until for claim in claims],
    )
    return {row["id"]: row["attempts"] for row in rows}


async def release_parked(
    connection: asyncpg.Connection, parked: dict[uuid.UUID, datetime]
) -> dict[uuid.UUID, int]:
    """Make parked deliveries (id to parking token) due at once, as repark does with no
    wait, and return the attempt count of each one released."""
    if not parked:
        return {}
    rows = await connection.fetch(_REPARK, list(parked), list(parked.values()), 0.0)
    return {row["id"]: row["attempts"] for row in rows}


# The attempt, the delivery's new state and, once it succeeded, the message's
# `webhook_sent` flag ($9 is NULL otherwise), in one statement.
_RECORD_ATTEMPT = """
    WITH attempt AS (
        INSERT INTO webhookattempt
            (delivery_id, attempt_number, started_at, duration_ms, status_code, error,
             next_retry_at)
        VALUES ($1, $2, $3, $4, $5::integer, $6::text, $7::timestamptz)
    ),
    delivery AS (
        UPDATE webhookdelivery
        SET status = $8::varchar,
            next_attempt_at = $7::timestamptz,
            last_status_code = $5::integer,
            last_error = $6::text,
            completed_at = CASE WHEN $8::varchar = 'pending' THEN NULL ELSE now() END,
            updated_at = now()
        WHERE id = $1
    )
    UPDATE smsmessage SET webhook_sent = true
    WHERE id = $9::uuid AND NOT webhook_sent
"""


async def record_attempt(
    connection: asyncpg.Connection,
    claimed: ClaimedDelivery,
    result: AttemptResult,
    *,
    status: str,
    next_retry_at: datetime | None,
    disabled_reason: str | None = None,
) -> None:
    """Store one attempt and the delivery's new state, and mark a notified message.

    With a `disabled_reason`, the webhook is also deactivated with that reason and its
    other pending deliveries cancelled, in the same transaction.
    """
    started_at = datetime.fromtimestamp(result.started_at, UTC)
    notified_message_id = (
        claimed.message_id if status == WebhookDeliveryStatus.SUCCEEDED else None
    )
    arguments = (
        claimed.delivery_id,
        claimed.attempt_number,
        started_at,
        result.duration_ms,
        result.status_code,
        result.error,
        next_retry_at,
        str(status),
        notified_message_id,
    )
    if disabled_reason is None:
        await connection.execute(_RECORD_ATTEMPT, *arguments)
        return

    async with connection.transaction():
        await connection.execute(_RECORD_ATTEMPT, *arguments)
        await disable_webhook(connection, claimed.webhook_id, disabled_reason)


async def cancel(session: AsyncSession, delivery_id: uuid.UUID, reason: str) -> None:
    await session.execute(
        text(
            """
            UPDATE webhookdelivery
            SET status = 'cancelled', last_error = :reason, next_attempt_at = NULL,
                completed_at = now(), updated_at = now()
            WHERE id = :delivery_id AND (status || '') = 'pending'
            """
        ),
        {"delivery_id": delivery_id, "reason": reason},
    )


async def disable_webhook(
    connection: asyncpg.Connection, webhook_id: uuid.UUID, reason: str
) -> None:
    """Deactivate a webhook with `reason` and cancel its pending deliveries.

    `reason` is a DISABLED_REASONS code. `disabled_at` keeps the time of the first
    deactivation for the same reason, so that deliveries finishing later with the same
    response do not move it.
    """
    await connection.execute(
        """
        UPDATE webhookconfig
        SET disabled_at = CASE
                WHEN is_active OR disabled_reason IS DISTINCT FROM $2 THEN now()
                ELSE disabled_at
            END,
            is_active = false,
            disabled_reason = $2,
            updated_at = now()
        WHERE id = $1
        """,
        webhook_id,
        reason,
    )
    await connection.execute(
        """
        UPDATE webhookdelivery
        SET status = 'cancelled', last_error = 'webhook_disabled', next_attempt_at = NULL,
            completed_at = now(), updated_at = now()
        WHERE webhook_id = $1 AND status = 'pending'
        """,
        webhook_id,
    )


async def due_deliveries(session: AsyncSession, limit: int) -> dict[uuid.UUID, int]:
    """Return pending deliveries whose next attempt is due, oldest first, each with its
    attempt count.

    Both come from one statement, because a claim that commits between two reads would
    raise the count, and the sweep would then take the job id of the retry that the
    claim's attempt queues.
    """
    rows = await session.execute(
        text(
            """
            SELECT id, attempts FROM webhookdelivery
            WHERE status = 'pending' AND next_attempt_at <= now()
            ORDER BY next_attempt_at
            LIMIT :limit
            """
        ),
        {"limit": limit},
    )
    return {row[0]: row[1] for row in rows}
