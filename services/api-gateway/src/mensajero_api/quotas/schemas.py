"""Request and response bodies of the quota endpoints."""

import uuid
from datetime import date, datetime
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints

from mensajero_api.types import Email, RequestBody, Storable

# Storable: a NUL character would otherwise reach the plan lookup and fail in Postgres.
PlanCode = Annotated[str, StringConstraints(min_length=1, max_length=50), Storable]


class QuotaPublic(BaseModel):
    user_id: uuid.UUID
    plan: str = Field(description="Name of the plan.", examples=["Free"])
    plan_code: str = Field(examples=["free"])
    sms_sent_this_month: int = Field(
        description="Outgoing messages created since the last reset; each counts once, "
        "however many segments it takes."
    )
    max_sms_per_month: int
    sms_available: int = Field(description="SMS that can still be sent this month.")
    devices_registered: int
    max_devices: int
    devices_available: int
    last_reset_date: date = Field(description="UTC date of the last monthly reset.")
    reset_date: date = Field(
        description="Date of the next monthly reset; it happens at midnight UTC.",
        examples=["2024-02-01"],
    )
    reset_at: datetime = Field(
        description="The next monthly reset as an instant, ISO 8601 in UTC.",
        examples=["2024-02-01T00:00:00Z"],
    )


class PlanChange(RequestBody):
    user_id: uuid.UUID | None = Field(
        default=None,
        description="The user to change; with neither user_id nor email, the caller.",
    )
    email: Email | None = Field(
        default=None,
        description="The user to change, by email address, instead of user_id.",
        examples=["ana@example.com"],
    )
    plan: PlanCode = Field(
        description="Code of the new plan, as listed by GET /api/v1/sms/plans, in "
        "any letter case.",
        examples=["pro"],
    )
