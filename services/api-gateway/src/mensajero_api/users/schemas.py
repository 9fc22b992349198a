"""Request and response bodies of the user endpoints."""

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, EmailStr, Field

from mensajero_api.types import Name, Password

_REGION_DESCRIPTION = (
    "ISO 3166 region (e.g. MX) in which phone numbers without a leading + are read; "
    "null to accept only international numbers."
)


class UserCreate(BaseModel):
    email: EmailStr
    password: Password
    full_name: Name | None = None
    default_region: str | None = Field(default=None, description=_REGION_DESCRIPTION)


class UserUpdate(BaseModel):
    """Fields to change; a field left out keeps its value, null clears it."""

    full_name: Name | None = None
    default_region: str | None = Field(default=None, description=_REGION_DESCRIPTION)


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    full_name: str | None
    default_region: str | None
    is_active: bool
    is_superuser: bool
    created_at: datetime
