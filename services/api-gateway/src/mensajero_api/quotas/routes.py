"""The current user's quota, and plan changes by a superuser."""

from fastapi import APIRouter

from mensajero_api.deps import CurrentUser, LanguageDep, SessionDep, SettingsDep
from mensajero_api.envelope import Envelope, error_responses
from mensajero_api.jsonbody import JSONBodyRoute
from mensajero_api.quotas import service
from mensajero_api.quotas.schemas import PlanChange, QuotaPublic
from mensajero_common.i18n import translate

router = APIRouter(
    prefix="/api/v1/sms/quota", tags=["plans and quotas"], route_class=JSONBodyRoute
)


def _public(usage: service.Usage) -> QuotaPublic:
    quota, plan = usage.quota, usage.plan
    return QuotaPublic(
        user_id=quota.user_id,
        plan=plan.name,
        plan_code=plan.code,
        sms_sent_this_month=quota.sms_sent_this_month,
        max_sms_per_month=plan.max_sms_per_month,
        sms_available=max(plan.max_sms_per_month - quota.sms_sent_this_month, 0),
        devices_registered=quota.devices_registered,
        max_devices=plan.max_devices,
        devices_available=max(plan.max_devices - quota.devices_registered, 0),
        last_reset_date=quota.last_reset_date,
        reset_date=usage.period.next_reset_at.date(),
        reset_at=usage.period.next_reset_at,
    )


@router.get("", responses=error_responses(401))
async def read_quota(
    user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Envelope[QuotaPublic]:
    """Read the caller's plan, usage this month and the date of the next reset.

    The monthly SMS count starts again at midnight UTC on QUOTA_RESET_DAY.
    """
    usage = await service.get_user_quota(session, user.id, settings)
    return Envelope(data=_public(usage))


@router.put("/upgrade", responses=error_responses(400, 401, 403, 404, 422))
async def change_plan(
    data: PlanChange,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    language: LanguageDep,
) -> Envelope[QuotaPublic]:
    """Put a user on another plan (superusers only; anyone else gets 403).

    Body: `{"user_id": "<uuid>", "plan": "<code>"}`, or `{"email": "<address>", "plan":
    "<code>"}`; with neither `user_id` nor `email`, the caller. The plan's code matches
    in any letter case. The usage counters are kept, so after a downgrade below the
    current usage, new sends or devices are rejected until the usage fits or the month
    resets. Errors: 400 `user_id_and_email` (both given), 403 `superuser_required`, 404
    `user_not_found`, 404 `plan_not_found`.
    """
    usage = await service.change_plan(session, user, data, settings)
    return Envelope(
        data=_public(usage),
        message=translate("plan_changed", language, plan=usage.plan.name),
    )
