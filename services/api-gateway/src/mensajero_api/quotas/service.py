"""Charging plan limits, and the 429 `quota_exceeded` body when a limit is reached."""

import math
import uuid
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.quotas import repository
from mensajero_common.errors import QuotaExceededError
from mensajero_common.models import UserPlan, UserQuota
from mensajero_common.settings import Settings

UPGRADE_URL = "/api/v1/sms/plans"


class DefaultPlanMissingError(RuntimeError):
    """DEFAULT_PLAN names no row of `userplan`: a deployment error, not a client's."""

    def __init__(self, code: str) -> None:
        super().__init__(
            f"DEFAULT_PLAN is {code!r} but no plan in table userplan has that code; "
            "set DEFAULT_PLAN to an existing plan code (free, basic, pro, enterprise)"
        )


def next_quota_reset(now: datetime, reset_day: int) -> datetime:
    """Return the next midnight UTC on day `reset_day` of a month, strictly after `now`'s day.

    On the reset day itself the counters were reset at midnight, so the next reset is a
    month later. `reset_day` is at most 28 (a setting bound), so every month has that day.
    """
    now = now.astimezone(UTC)
    if now.day < reset_day:
        return datetime(now.year, now.month, reset_day, tzinfo=UTC)
    if now.month == 12:
        return datetime(now.year + 1, 1, reset_day, tzinfo=UTC)
    return datetime(now.year, now.month + 1, reset_day, tzinfo=UTC)


def _isoformat_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def sms_quota_exceeded(
    quota: UserQuota,
    plan: UserPlan,
    requested: int,
    settings: Settings,
    now: datetime | None = None,
) -> QuotaExceededError:
    now = now or datetime.now(UTC)
    reset_at = next_quota_reset(now, settings.QUOTA_RESET_DAY)
    used = quota.sms_sent_this_month
    available = max(plan.max_sms_per_month - used, 0)
    retry_after_s = max(math.ceil((reset_at - now).total_seconds()), 1)
    return QuotaExceededError(
        message_key="quota_exceeded_sms"
        if requested == 1
        else "quota_exceeded_sms_bulk",
        limit=plan.max_sms_per_month,
        available=available,
        details={
            "quota_type": "sms_monthly",
            "limit": plan.max_sms_per_month,
            "used": used,
            "available": available,
            "reset_date": _isoformat_utc(reset_at),
            "upgrade_url": UPGRADE_URL,
        },
        headers={"Retry-After": str(retry_after_s)},
    )


def device_quota_exceeded(quota: UserQuota, plan: UserPlan) -> QuotaExceededError:
    used = quota.devices_registered
    available = max(plan.max_devices - used, 0)
    return QuotaExceededError(
        message_key="quota_exceeded_devices",
        limit=plan.max_devices,
        details={
            "quota_type": "devices",
            "limit": plan.max_devices,
            "used": used,
            "available": available,
            # Device slots come back when a device is deleted, not on a date.
            "reset_date": None,
            "upgrade_url": UPGRADE_URL,
        },
    )


async def create_default_quota(
    session: AsyncSession, user_id: uuid.UUID, settings: Settings
) -> None:
    """Give the user a quota row on DEFAULT_PLAN, unless the user has one already."""
    plan = await repository.get_plan_by_code(session, settings.DEFAULT_PLAN)
    if plan is None:
        raise DefaultPlanMissingError(settings.DEFAULT_PLAN)
    await repository.insert_quota(session, user_id, plan.id)


async def _load_usage(
    session: AsyncSession, user_id: uuid.UUID, settings: Settings
) -> tuple[UserQuota, UserPlan]:
    usage = await repository.get_usage(session, user_id)
    if usage is not None:
        return usage

    # Sign-up always creates a quota row. A user inserted by hand in the database may
    # lack one, so it gets the default plan instead of a 429 on every request.
    await create_default_quota(session, user_id, settings)
    usage = await repository.get_usage(session, user_id)
    assert usage is not None
    return usage


async def take_device_slot(
    session: AsyncSession, user_id: uuid.UUID, settings: Settings
) -> None:
    """Count one more device in the caller's transaction, or raise QuotaExceededError."""
    if await repository.take_device_slot(session, user_id):
        return

    quota, plan = await _load_usage(session, user_id, settings)
    if (
        quota.devices_registered < plan.max_devices
        and await repository.take_device_slot(session, user_id)
    ):
        return
    raise device_quota_exceeded(quota, plan)


async def charge_sms(
    session: AsyncSession, user_id: uuid.UUID, count: int, settings: Settings
) -> None:
    """Count `count` more SMS in the caller's transaction, or raise QuotaExceededError."""
    if await repository.charge_sms(session, user_id, count):
        return

    quota, plan = await _load_usage(session, user_id, settings)
    if quota.sms_sent_this_month + count <= plan.max_sms_per_month and (
        await repository.charge_sms(session, user_id, count)
    ):
        return
    raise sms_quota_exceeded(quota, plan, count, settings)
