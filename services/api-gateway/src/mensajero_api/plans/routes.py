"""The plans on offer."""

from fastapi import APIRouter

from mensajero_api.deps import CurrentUser, SessionDep, SettingsDep
from mensajero_api.envelope import Envelope, error_responses
from mensajero_api.jsonbody import JSONBodyRoute
from mensajero_api.plans import service
from mensajero_api.plans.schemas import PlanList

router = APIRouter(
    prefix="/api/v1/sms", tags=["plans and quotas"], route_class=JSONBodyRoute
)


@router.get("/plans", responses=error_responses(401))
async def list_plans(
    user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Envelope[PlanList]:
    """List the plans, cheapest first, with their monthly SMS and device limits.

    `current` marks the caller's plan. A superuser changes a user's plan with
    `PUT /api/v1/sms/quota/upgrade`.
    """
    plans = await service.list_plans(session, user, settings)
    return Envelope(data=PlanList(items=plans))
