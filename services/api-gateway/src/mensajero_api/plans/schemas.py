"""Response bodies of the plan listing."""

from decimal import Decimal

from pydantic import BaseModel, Field


class PlanPublic(BaseModel):
    code: str = Field(
        description="Machine name, used by DEFAULT_PLAN and the upgrade endpoint.",
        examples=["free"],
    )
    name: str = Field(examples=["Free"])
    max_sms_per_month: int
    max_devices: int
    price: Decimal = Field(
        description="Monthly price in USD, as a decimal string.", examples=["9.99"]
    )
    current: bool = Field(description="Whether the caller is on this plan.")


class PlanList(BaseModel):
    items: list[PlanPublic]
