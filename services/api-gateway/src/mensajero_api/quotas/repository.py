"""Queries on plans and quotas, including the atomic charges of SMS and device slots.

Every charge is one conditional UPDATE: Postgres locks the quota row, and a concurrent
charge waits for it, then evaluates its WHERE clause again on the updated row. So N
parallel requests against one remaining unit charge exactly one, without a SELECT … FOR
UPDATE round trip, and the charge rolls back with the rest of the caller's transaction.

A row whose `last_reset_date` is before `period_start` (the latest monthly reset
boundary, see mensajero_common.quota_period) still counts an earlier month. The SMS
charge resets such a row in the same UPDATE that charges it, and `reset_if_stale` resets
it before a read.
"""

import uuid
from datetime import UTC, date, datetime

from sqlalchemy import case, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common.models import UserPlan, UserQuota

_PLAN_MAX_DEVICES = (
    select(UserPlan.max_devices)
    .where(UserPlan.id == UserQuota.plan_id)
    .scalar_subquery()
)
_PLAN_MAX_SMS = (
    select(UserPlan.max_sms_per_month)
    .where(UserPlan.id == UserQuota.plan_id)
    .scalar_subquery()
)


async def get_plan_by_code(session: AsyncSession, code: str) -> UserPlan | None:
    """Find a plan by its code in any letter case, the exact spelling first."""
    statement = (
        select(UserPlan)
        .where(func.lower(UserPlan.code) == code.lower())
        .order_by((UserPlan.code == code).desc(), UserPlan.code)
        .limit(1)
    )
    return (await session.scalars(statement)).first()


async def insert_quota(
    session: AsyncSession, user_id: uuid.UUID, plan_id: uuid.UUID
) -> None:
    """Create the user's quota row unless it exists already."""
    # The UTC date, like the reset boundaries; the column default CURRENT_DATE follows
    # the database session's time zone instead.
    statement = (
        insert(UserQuota)
        .values(
            user_id=user_id,
            plan_id=plan_id,
            last_reset_date=datetime.now(UTC).date(),
        )
        .on_conflict_do_nothing(index_elements=[UserQuota.user_id])
    )
    await session.execute(statement)


async def set_plan(
    session: AsyncSession, user_id: uuid.UUID, plan_id: uuid.UUID, today: date
) -> None:
    """Put the user on another plan, keeping the counters; create the row if missing."""
    statement = (
        insert(UserQuota)
        .values(user_id=user_id, plan_id=plan_id, last_reset_date=today)
        .on_conflict_do_update(
            index_elements=[UserQuota.user_id],
            set_={"plan_id": plan_id, "updated_at": func.now()},
        )
    )
    await session.execute(statement)


async def reset_if_stale(
    session: AsyncSession, user_id: uuid.UUID, period_start: date, today: date
) -> bool:
    """Reset the monthly SMS count if it predates `period_start`; tell whether it did."""
    statement = (
        update(UserQuota)
        .where(UserQuota.user_id == user_id, UserQuota.last_reset_date < period_start)
        .values(sms_sent_this_month=0, last_reset_date=today)
        .returning(UserQuota.id)
        .execution_options(synchronize_session=False)
    )
    return (await session.execute(statement)).first() is not None


async def get_usage(
    session: AsyncSession, user_id: uuid.UUID
) -> tuple[UserQuota, UserPlan] | None:
    statement = (
        select(UserQuota, UserPlan)
        .join(UserPlan, UserPlan.id == UserQuota.plan_id)
        .where(UserQuota.user_id == user_id)
        # The caller reads the counters after a refused charge: fresh values, not the
        # ones an earlier query of this session left in the identity map.
        .execution_options(populate_existing=True)
    )
    row = (await session.execute(statement)).one_or_none()
    if row is None:
        return None
    return row[0], row[1]


async def take_device_slot(session: AsyncSession, user_id: uuid.UUID) -> bool:
    """Count one more registered device if the plan allows it; tell whether it did."""
    statement = (
        update(UserQuota)
        .where(
            UserQuota.user_id == user_id,
            UserQuota.devices_registered < _PLAN_MAX_DEVICES,
        )
        .values(devices_registered=UserQuota.devices_registered + 1)
        .returning(UserQuota.devices_registered)
        .execution_options(synchronize_session=False)
    )
    return (await session.execute(statement)).first() is not None


async def release_device_slot(session: AsyncSession, user_id: uuid.UUID) -> None:
    statement = (
        update(UserQuota)
        .where(UserQuota.user_id == user_id, UserQuota.devices_registered > 0)
        .values(devices_registered=UserQuota.devices_registered - 1)
        .execution_options(synchronize_session=False)
    )
    await session.execute(statement)


async def charge_sms(
    session: AsyncSession,
    user_id: uuid.UUID,
    count: int,
    *,
    period_start: date,
    today: date,
) -> bool:
    """Count `count` more SMS this month if the plan allows all of them; tell whether it did.

    A row last reset before `period_start` is charged from 0, and gets `today` as its
    reset date, in the same statement.
    """
    stale = UserQuota.last_reset_date < period_start
    sent_this_period = case((stale, 0), else_=UserQuota.sms_sent_this_month)
    statement = (
        update(UserQuota)
        .where(
            UserQuota.user_id == user_id,
            sent_this_period + count <= _PLAN_MAX_SMS,
        )
        .values(
            sms_sent_this_month=sent_this_period + count,
            last_reset_date=case((stale, today), else_=UserQuota.last_reset_date),
        )
        .returning(UserQuota.sms_sent_this_month)
        .execution_options(synchronize_session=False)
    )
    return (await session.execute(statement)).first() is not None


async def release_sms(session: AsyncSession, user_id: uuid.UUID, count: int) -> None:
    """Take back `count` SMS charged earlier in the caller's transaction.

    Not through charge_sms with a negative count: should a monthly reset boundary pass
    between the two statements, that would reset the row and leave it below zero.
    """
    statement = (
        update(UserQuota)
        .where(UserQuota.user_id == user_id)
        .values(
            sms_sent_this_month=func.greatest(UserQuota.sms_sent_this_month - count, 0)
        )
        .execution_options(synchronize_session=False)
    )
    await session.execute(statement)
