"""Queries on quota rows that the dispatcher's monthly reset runs."""

from datetime import date

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common.models import UserQuota


async def reset_stale_quotas(
    session: AsyncSession, *, period_start: date, today: date, limit: int
) -> int:
    """Reset up to `limit` rows last reset before `period_start`; return how many.

    Rows that a send is charging right now are skipped (SKIP LOCKED) rather than waited
    for: that charge resets its row itself in the same UPDATE.
    """
    stale_ids = (
        select(UserQuota.id)
        .where(UserQuota.last_reset_date < period_start)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    statement = (
        update(UserQuota)
        .where(UserQuota.id.in_(stale_ids))
        .values(sms_sent_this_month=0, last_reset_date=today)
        .returning(UserQuota.id)
        .execution_options(synchronize_session=False)
    )
    return len((await session.execute(statement)).all())
