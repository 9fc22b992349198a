"""The plans a user can be on, and which one the user has."""

from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.plans import repository
from mensajero_api.plans.schemas import PlanPublic
from mensajero_api.quotas import service as quotas_service
from mensajero_common.models import User
from mensajero_common.settings import Settings


async def list_plans(
    session: AsyncSession, user: User, settings: Settings
) -> list[PlanPublic]:
    """Return the active plans, cheapest first, marking the caller's own."""
    usage = await quotas_service.get_user_quota(session, user.id, settings)
    plans = await repository.list_active_plans(session)
    return [
        PlanPublic(
            code=plan.code,
            name=plan.name,
            max_sms_per_month=plan.max_sms_per_month,
            max_devices=plan.max_devices,
            price=plan.price,
            current=plan.id == usage.plan.id,
        )
        for plan in plans
    ]
