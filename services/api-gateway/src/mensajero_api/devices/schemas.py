"""Request and response bodies of the device endpoints."""

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from mensajero_api.types import (
    DeviceName,
    PhoneNumberText,
    QueryParameters,
    RequestBody,
)
from mensajero_common.models import DeviceStatus

_PHONE_DESCRIPTION = (
    "The SIM's number: E.164, or national in the user's default region. "
    "At most 64 characters; stored in E.164."
)


# Ten years: long enough for any phone, short enough that the date stays valid.
MAX_KEY_EXPIRES_IN_DAYS = 3650
_EXPIRY_DESCRIPTION = (
    "Days until the API key stops working (the phone then gets close code 4001 and "
    "needs a rotated key); null for a key that never expires."
)


class DeviceCreate(RequestBody):
    name: DeviceName
    phone_number: PhoneNumberText | None = Field(
        default=None, description=_PHONE_DESCRIPTION
    )
    api_key_expires_in_days: StrictInt | None = Field(
        default=None, ge=1, le=MAX_KEY_EXPIRES_IN_DAYS, description=_EXPIRY_DESCRIPTION
    )


class DeviceKeyRotate(RequestBody):
    api_key_expires_in_days: StrictInt | None = Field(
        default=None, ge=1, le=MAX_KEY_EXPIRES_IN_DAYS, description=_EXPIRY_DESCRIPTION
    )


class DeviceUpdate(RequestBody):
    """Fields to change; a field left out keeps its value."""

    # The None defaults below only mark a field as left out: pydantic does not validate
    # defaults, so an explicit null still fails, as these columns are NOT NULL.
    name: DeviceName = Field(default=None)  # type: ignore[assignment]
    phone_number: PhoneNumberText | None = Field(
        default=None, description=_PHONE_DESCRIPTION + " Null clears it."
    )
    is_active: StrictBool = Field(
        default=None,  # type: ignore[assignment]
        description="false disables the device and closes its live connection.",
    )


class DevicePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    phone_number: str | None
    status: DeviceStatus
    is_active: bool
    api_key_prefix: str = Field(description="First characters of the current API key.")
    api_key_expires_at: datetime | None
    last_heartbeat: datetime | None
    app_version: str | None
    created_at: datetime
    updated_at: datetime


class DeviceWithKey(DevicePublic):
    """A device with its new API key, returned once at registration and rotation."""

    device_id: uuid.UUID
    api_key: str = Field(description="Shown only now; the server keeps only its hash.")


class DeviceList(BaseModel):
    items: list[DevicePublic]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )
    limit: int


class DeviceListQuery(QueryParameters):
    """Query parameters of the device listing."""

    limit: int = Field(default=50, ge=1, le=100)
    cursor: str | None = Field(
        default=None, max_length=512, description="`next_cursor` of the previous page."
    )
    order: Literal["desc", "asc"] = Field(
        default="desc",
        description="By registration time: newest first (desc) or oldest first.",
    )
    status: list[DeviceStatus] | None = Field(
        default=None, description="Repeat to match any of several statuses."
    )
    is_active: bool | None = Field(
        default=None,
        description="true for enabled devices, false for the ones disabled by "
        "`is_active: false`.",
    )


class DeviceDeleted(BaseModel):
    device_id: uuid.UUID
    deleted: bool = True
