"""Request and response bodies of the user endpoints."""

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from mensajero_api.types import Email, Name, Password, RequestBody, StorableStr

_REGION_DESCRIPTION = (
    "ISO 3166 region (e.g. MX) in which phone numbers without a leading + are read; "
    "null to accept only international numbers."
)


class UserCreate(RequestBody):
    email: Email
    password: Password
    full_name: Name | None = None
    # StorableStr: plain `str | None` lets an unpaired surrogate through (pydantic 2.14),
    # and the invalid_region error that echoes it cannot be encoded, a 500.
    default_region: StorableStr | None = Field(
        default=None, description=_REGION_DESCRIPTION
    )


class UserUpdate(RequestBody):
    """Fields to change; a field left out keeps its value, null clears it."""

    full_name: Name | None = None
    default_region: StorableStr | None = Field(
        default=None, description=_REGION_DESCRIPTION
    )


class PasswordChange(RequestBody):
    # No length rule on the current password: it only has to match the stored hash.
    current_password: Annotated[str, StringConstraints(max_length=128)]
    new_password: Password


class PasswordChanged(BaseModel):
    """A fresh bearer token: the change revoked every token issued before it."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the token expires.")


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    full_name: str | None
    default_region: str | None
    is_active: bool
    is_superuser: bool
    created_at: datetime
