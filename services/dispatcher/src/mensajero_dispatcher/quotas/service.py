"""The monthly quota reset: every user's SMS count starts again at midnight UTC on
QUOTA_RESET_DAY.

The job runs every QUOTA_RESET_CHECK_INTERVAL_S and resets each row whose
`last_reset_date` is before the latest reset boundary, setting it to today's UTC date.
So it is idempotent (a second run finds nothing to reset), and a run missed while no
dispatcher was up is caught up by the next one. The API also resets a row lazily when it
reads or charges it, so a late job never lets a user send on last month's count.
"""

from datetime import UTC, datetime

import structlog

from mensajero_common.db import session_scope
from mensajero_common.quota_period import current_period_start, utc_today
from mensajero_dispatcher.context import DispatcherContext
from mensajero_dispatcher.quotas import repository

log = structlog.get_logger(__name__)

# Rows reset per transaction, to keep row locks short on a large table.
RESET_BATCH_SIZE = 1000


async def reset_monthly_quotas(
    ctx: DispatcherContext, now: datetime | None = None
) -> int:
    """Reset every quota row not yet reset in the current period; return how many."""
    now = now or datetime.now(UTC)
    period_start = current_period_start(now, ctx.settings.QUOTA_RESET_DAY)
    today = utc_today(now)

    total = 0
    while True:
        async with session_scope(ctx.session_factory) as session:
            count = await repository.reset_stale_quotas(
                session, period_start=period_start, today=today, limit=RESET_BATCH_SIZE
            )
        total += count
        # Reset rows are no longer stale, so every full batch makes progress.
        if count < RESET_BATCH_SIZE:
            break

    if total:
        log.info(
            "monthly quotas reset", count=total, period_start=period_start.isoformat()
        )
    return total
