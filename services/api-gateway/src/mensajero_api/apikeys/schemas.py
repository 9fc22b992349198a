"""Request and response bodies of the user API key endpoints."""

import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, StrictInt

from mensajero_api.types import Name, QueryParameters, RequestBody
from mensajero_common.models import UserApiKey

# Ten years: long enough for any deployment, short enough that the date stays valid.
MAX_EXPIRES_IN_DAYS = 3650

ApiKeyStatus = Literal["active", "expired", "revoked"]


class ApiKeyCreate(RequestBody):
    name: Name = Field(description="What the key is for, e.g. the server that uses it.")
    expires_in_days: StrictInt | None = Field(
        default=None,
        ge=1,
        le=MAX_EXPIRES_IN_DAYS,
        description="Days until the key stops working; null for a key that never expires.",
    )


class ApiKeyPublic(BaseModel):
    id: uuid.UUID
    name: str
    key_prefix: str = Field(description="First characters of the key.")
    status: ApiKeyStatus
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = Field(
        description="Approximate: updated at most once every few minutes."
    )
    created_at: datetime

    @classmethod
    def from_model(
        cls, api_key: UserApiKey, now: datetime | None = None
    ) -> "ApiKeyPublic":
        return cls(
            id=api_key.id,
            name=api_key.name,
            key_prefix=api_key.key_prefix,
            status=key_status(api_key, now or datetime.now(UTC)),
            expires_at=api_key.expires_at,
            revoked_at=api_key.revoked_at,
            last_used_at=api_key.last_used_at,
            created_at=api_key.created_at,
        )


class ApiKeyWithSecret(ApiKeyPublic):
    """A new API key with its value, returned only once, at creation."""

    api_key: str = Field(
        description="Send as the X-API-Key header. Shown only now; the server keeps its hash."
    )


class ApiKeyList(BaseModel):
    items: list[ApiKeyPublic]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )
    limit: int


class ApiKeyListQuery(QueryParameters):
    """Query parameters of the API key listing."""

    limit: int = Field(default=50, ge=1, le=100)
    cursor: str | None = Field(
        default=None, max_length=512, description="`next_cursor` of the previous page."
    )


def key_status(api_key: UserApiKey, now: datetime) -> ApiKeyStatus:
    if api_key.revoked_at is not None:
        return "revoked"
    if api_key.expires_at is not None and api_key.expires_at <= now:
        return "expired"
    return "active"
