"""Queries on the `userplan` table."""

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common.models import UserPlan


async def list_active_plans(session: AsyncSession) -> Sequence[UserPlan]:
    """Return the plans a user can be put on, cheapest first."""
    statement = (
        select(UserPlan)
        .where(UserPlan.is_active.is_(True))
        .order_by(UserPlan.price, UserPlan.max_sms_per_month, UserPlan.code)
    )
    return (await session.scalars(statement)).all()
