"""Charging plan limits, reading and changing a user's plan, and the 429
`quota_exceeded` body when a limit is reached.

Counting rules: each outgoing message counts once when it is created, whatever its
number of segments. A registered device takes a slot until it is deleted. The monthly
SMS count starts again at midnight UTC on QUOTA_RESET_DAY (see
mensajero_common.quota_period).
"""

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.plans import repository as plans_repository
from mensajero_api.quotas import repository
from mensajero_api.quotas.schemas import PlanChange
from mensajero_api.users import repository as users_repository
from mensajero_common.errors import (
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    ValidationFailedError,
)
from mensajero_common.models import User, UserPlan, UserQuota
from mensajero_common.quota_period import (
    current_period_start,
    next_quota_reset,
    utc_today,
)
from mensajero_common.settings import Settings

logger = structlog.get_logger(__name__)

UPGRADE_URL = "/api/v1/sms/plans"


class DefaultPlanMissingError(RuntimeError):
    """DEFAULT_PLAN names no active row of `userplan`: a deployment error, not a client's."""

    def __init__(self, code: str, *, inactive: bool = False) -> None:
        found = (
            "the plan with that code is inactive, so GET /api/v1/sms/plans hides it"
            if inactive
            else "no plan in table userplan has that code"
        )
        super().__init__(
            f"DEFAULT_PLAN is {code!r} but {found}; set DEFAULT_PLAN to the code of an "
            "active plan (free, basic, pro, enterprise)"
        )


class SuperuserRequiredError(PermissionDeniedError):
    code = "superuser_required"


class UserNotFoundError(NotFoundError):
    code = "user_not_found"

    def __init__(self, user_id: uuid.UUID) -> None:
        super().__init__(user_id=str(user_id), details={"user_id": str(user_id)})


class UserEmailNotFoundError(NotFoundError):
    code = "user_not_found"

    def __init__(self, email: str) -> None:
        super().__init__(
            message_key="user_email_not_found", email=email, details={"email": email}
        )


class PlanChangeTargetError(ValidationFailedError):
    """Both user_id and email name the user whose plan changes."""

    code = "user_id_and_email"


class PlanNotFoundError(NotFoundError):
    """No active plan has this code."""

    code = "plan_not_found"

    def __init__(self, plan: str, available: list[str]) -> None:
        super().__init__(
            plan=plan,
            available=", ".join(available),
            details={"plan": plan, "available": available},
        )


@dataclass(frozen=True)
class QuotaPeriod:
    """The reset boundaries around one moment, for the quota queries."""

    start: date
    today: date
    next_reset_at: datetime

    @classmethod
    def at(cls, now: datetime, settings: Settings) -> "QuotaPeriod":
        return cls(
            start=current_period_start(now, settings.QUOTA_RESET_DAY),
            today=utc_today(now),
            next_reset_at=next_quota_reset(now, settings.QUOTA_RESET_DAY),
        )


@dataclass(frozen=True)
class Usage:
    """A user's quota row with its plan, reset for the current period."""

    quota: UserQuota
    plan: UserPlan
    period: QuotaPeriod


def _isoformat_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def sms_quota_exceeded(
    quota: UserQuota,
    plan: UserPlan,
    requested: int,
    settings: Settings,
    now: datetime | None = None,
    *,
    bulk: bool = False,
) -> QuotaExceededError:
    now = now or datetime.now(UTC)
    reset_at = next_quota_reset(now, settings.QUOTA_RESET_DAY)
    used = quota.sms_sent_this_month
    available = max(plan.max_sms_per_month - used, 0)
    retry_after_s = max(math.ceil((reset_at - now).total_seconds()), 1)
    # A bulk send always states how many SMS still fit, even 0, because "you can only
    # send N more" explains why its batch was too large. A single send states the limit.
    single = requested == 1 and not bulk
    return QuotaExceededError(
        message_key="quota_exceeded_sms" if single else "quota_exceeded_sms_bulk",
        limit=plan.max_sms_per_month,
        available=available,
        requested=requested,
        reset_date=reset_at.date().isoformat(),
        upgrade_url=UPGRADE_URL,
        details={
            "quota_type": "sms_monthly",
            "limit": plan.max_sms_per_month,
            "used": used,
            "available": available,
            # The day of the reset, as GET /api/v1/sms/quota gives it; reset_at is
            # the exact moment.
            "reset_date": reset_at.date().isoformat(),
            "reset_at": _isoformat_utc(reset_at),
            "upgrade_url": UPGRADE_URL,
        },
        headers={"Retry-After": str(retry_after_s)},
    )


def device_quota_exceeded(quota: UserQuota, plan: UserPlan) -> QuotaExceededError:
    used = quota.devices_registered
    available = max(plan.max_devices - used, 0)
    # A user moved to a smaller plan keeps the devices registered before, so `used` can
    # be above the limit, and deleting one device then frees no slot. With a limit of 0
    # no deletion frees one, so that case keeps the message for the limit alone.
    over_limit = used > plan.max_devices > 0
    return QuotaExceededError(
        message_key=(
            "quota_exceeded_devices_over_limit"
            if over_limit
            else "quota_exceeded_devices"
        ),
        limit=plan.max_devices,
        used=used,
        to_delete=used - plan.max_devices + 1,
        upgrade_url=UPGRADE_URL,
        details={
            "quota_type": "devices",
            "limit": plan.max_devices,
            "used": used,
            "available": available,
            # Device slots come back when a device is deleted, not on a date. Both
            # fields stay, null, so that every quota_exceeded body has the same keys.
            "reset_date": None,
            "reset_at": None,
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
    session: AsyncSession, user_id: uuid.UUID, settings: Settings, now: datetime
) -> Usage:
    """Return the user's quota and plan, resetting a count of an earlier month first."""
    period = QuotaPeriod.at(now, settings)
    await repository.reset_if_stale(session, user_id, period.start, period.today)
    usage = await repository.get_usage(session, user_id)
    if usage is None:
        # Sign-up always creates a quota row. A user inserted by hand in the database may
        # lack one, so it gets the default plan instead of a 429 on every request.
        await create_default_quota(session, user_id, settings)
        usage = await repository.get_usage(session, user_id)
        assert usage is not None
    quota, plan = usage
    return Usage(quota=quota, plan=plan, period=period)


async def take_device_slot(
    session: AsyncSession, user_id: uuid.UUID, settings: Settings
) -> None:
    """Count one more device in the caller's transaction, or raise QuotaExceededError."""
    if await repository.take_device_slot(session, user_id):
        return

    usage = await _load_usage(session, user_id, settings, datetime.now(UTC))
    quota, plan = usage.quota, usage.plan
    if (
        quota.devices_registered < plan.max_devices
        and await repository.take_device_slot(session, user_id)
    ):
        return
    raise device_quota_exceeded(quota, plan)


async def charge_sms(
    session: AsyncSession,
    user_id: uuid.UUID,
    count: int,
    settings: Settings,
    *,
    bulk: bool = False,
) -> None:
    """Count `count` more SMS in the caller's transaction, or raise QuotaExceededError.

    Either all `count` are charged or none, so a bulk send that does not fit whole is
    rejected whole.
    """
    now = datetime.now(UTC)
    period = QuotaPeriod.at(now, settings)
    if await repository.charge_sms(
        session, user_id, count, period_start=period.start, today=period.today
    ):
        return

    usage = await _load_usage(session, user_id, settings, now)
    quota, plan = usage.quota, usage.plan
    if quota.sms_sent_this_month + count <= plan.max_sms_per_month and (
        await repository.charge_sms(
            session, user_id, count, period_start=period.start, today=period.today
        )
    ):
        return
    raise sms_quota_exceeded(quota, plan, count, settings, now, bulk=bulk)


async def try_charge_sms(
    session: AsyncSession, user_id: uuid.UUID, count: int, settings: Settings
) -> bool:
    """Count `count` more SMS in the caller's transaction if all fit; tell whether it did.

    Unlike charge_sms, it raises nothing and builds no error.
    """
    period = QuotaPeriod.at(datetime.now(UTC), settings)
    return await repository.charge_sms(
        session, user_id, count, period_start=period.start, today=period.today
    )


async def release_sms(session: AsyncSession, user_id: uuid.UUID, count: int) -> None:
    """Take back `count` SMS charged earlier in the caller's transaction."""
    await repository.release_sms(session, user_id, count)


async def get_user_quota(
    session: AsyncSession, user_id: uuid.UUID, settings: Settings
) -> Usage:
    """Return the user's usage in the current month, and commit a lazy reset if one ran."""
    usage = await _load_usage(session, user_id, settings, datetime.now(UTC))
    await session.commit()
    return usage


async def change_plan(
    session: AsyncSession, actor: User, data: PlanChange, settings: Settings
) -> Usage:
    """Put a user (by `data.user_id` or `data.email`, else the actor) on another plan;
    commit.

    Only a superuser may do it. The counters stay as they are: after a downgrade below
    the current usage, new sends and registrations are rejected until the usage fits.
    """
    if not actor.is_superuser:
        raise SuperuserRequiredError()

    if data.user_id is not None and data.email is not None:
        raise PlanChangeTargetError()
    if data.email is not None:
        target = await users_repository.get_user_by_email(session, data.email)
        if target is None:
            raise UserEmailNotFoundError(data.email)
        user_id = target.id
    else:
        user_id = data.user_id or actor.id
        if await users_repository.get_user(session, user_id) is None:
            raise UserNotFoundError(user_id)
    plan = await repository.get_plan_by_code(session, data.plan)
    if plan is None or not plan.is_active:
        plans = await plans_repository.list_active_plans(session)
        raise PlanNotFoundError(data.plan, [known.code for known in plans])

    previous = await repository.get_usage(session, user_id)
    await repository.set_plan(session, user_id, plan.id, utc_today(datetime.now(UTC)))
    usage = await get_user_quota(session, user_id, settings)

    logger.info(
        "plan changed",
        user_id=str(user_id),
        changed_by=str(actor.id),
        previous_plan=previous[1].code if previous else None,
        plan=plan.code,
    )
    return usage
