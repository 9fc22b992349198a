"""Devices (Android phones) of the current user and their API keys."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from mensajero_api.deps import (
    CurrentUser,
    KeysDep,
    LanguageDep,
    RedisDep,
    SessionDep,
    SettingsDep,
)
from mensajero_api.devices import service
from mensajero_api.devices.schemas import (
    DeviceCreate,
    DeviceDeleted,
    DeviceKeyRotate,
    DeviceList,
    DeviceListQuery,
    DevicePublic,
    DeviceUpdate,
    DeviceWithKey,
)
from mensajero_api.envelope import Envelope, error_responses
from mensajero_api.jsonbody import JSONBodyRoute
from mensajero_common.i18n import translate
from mensajero_common.models import SMSDevice

router = APIRouter(
    prefix="/api/v1/sms/devices", tags=["devices"], route_class=JSONBodyRoute
)


def _with_key(device: SMSDevice, api_key: str) -> DeviceWithKey:
    public = DevicePublic.model_validate(device)
    return DeviceWithKey(**public.model_dump(), device_id=device.id, api_key=api_key)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(400, 401, 422, quota=True),
)
async def register_device(
    data: DeviceCreate,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    language: LanguageDep,
) -> Envelope[DeviceWithKey]:
    """Register a device and create its API key, shown only in this response.

    Counts against the plan's device limit: past it, 429 `quota_exceeded` with
    `quota_type` "devices".
    """
    device, api_key = await service.register_device(session, settings, user, data)
    return Envelope(
        data=_with_key(device, api_key),
        message=translate("device_registered", language),
    )


@router.get("", responses=error_responses(400, 401, 422))
async def list_devices(
    user: CurrentUser,
    session: SessionDep,
    query: Annotated[DeviceListQuery, Query()],
) -> Envelope[DeviceList]:
    """List the user's devices, newest first unless `order=asc`, by keyset pagination.

    One page of up to `limit` devices (default 50, at most 100). Pass `next_cursor` as
    `cursor` for the next page, with the same `order`, until it is null. `status`
    (repeatable) and `is_active` narrow the listing. A cursor that this listing did not
    return, or one made for the other `order`, gets 400 `invalid_cursor`, and an unknown
    query parameter gets 422.
    """
    devices, next_cursor = await service.list_devices(session, user, query)
    return Envelope(
        data=DeviceList(
            items=[DevicePublic.model_validate(d) for d in devices],
            next_cursor=next_cursor,
            limit=query.limit,
        )
    )


@router.get("/{device_id}", responses=error_responses(401, 404, 422))
async def read_device(
    device_id: uuid.UUID, user: CurrentUser, session: SessionDep
) -> Envelope[DevicePublic]:
    device = await service.get_device(session, user, device_id)
    return Envelope(data=DevicePublic.model_validate(device))


@router.put("/{device_id}", responses=error_responses(400, 401, 404, 422))
async def update_device(
    device_id: uuid.UUID,
    data: DeviceUpdate,
    user: CurrentUser,
    session: SessionDep,
    redis: RedisDep,
    keys: KeysDep,
    language: LanguageDep,
) -> Envelope[DevicePublic]:
    """Change the name, number or active flag; fields left out keep their values."""
    device = await service.update_device(session, redis, keys, user, device_id, data)
    return Envelope(
        data=DevicePublic.model_validate(device),
        message=translate("device_updated", language),
    )


@router.delete("/{device_id}", responses=error_responses(401, 404, 422))
async def delete_device(
    device_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    redis: RedisDep,
    keys: KeysDep,
    language: LanguageDep,
) -> Envelope[DeviceDeleted]:
    """Delete the device: its key stops working, and its slot returns to the quota.

    Its messages not yet sent end within seconds. A message sent to this device fails
    and gets its quota charge back, one that named no device goes to another device,
    and one that the phone had already taken fails with `no_report`.
    """
    await service.delete_device(session, redis, keys, user, device_id)
    return Envelope(
        data=DeviceDeleted(device_id=device_id),
        message=translate("device_deleted", language),
    )


@router.post("/{device_id}/rotate-key", responses=error_responses(401, 404, 422))
async def rotate_device_key(
    device_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    redis: RedisDep,
    keys: KeysDep,
    settings: SettingsDep,
    language: LanguageDep,
    data: DeviceKeyRotate | None = None,
) -> Envelope[DeviceWithKey]:
    """Replace the API key: the old one stops working at once, live connections included.

    The body is optional; `api_key_expires_in_days` gives the new key an expiry.
    """
    expires_in_days = data.api_key_expires_in_days if data is not None else None
    device, api_key = await service.rotate_api_key(
        session, redis, keys, settings, user, device_id, expires_in_days
    )
    return Envelope(
        data=_with_key(device, api_key),
        message=translate("device_key_rotated", language),
    )
