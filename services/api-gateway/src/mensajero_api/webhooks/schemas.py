"""Request and response bodies of the webhook endpoints."""

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from mensajero_api.types import QueryParameters, RequestBody, Storable
from mensajero_common.webhooks import DISABLED_GONE, EVENT_SMS_RECEIVED, EVENTS

WebhookURL = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2048)
]
# The service checks length and form, so that the error message is localized.
Secret = Annotated[str, StringConstraints(max_length=1024), Storable]
# Event names are checked by the service, which can name the allowed ones in its error.
EventName = Annotated[str, StringConstraints(min_length=1, max_length=64)]

_EVENTS_DESCRIPTION = f"Events to receive, among: {', '.join(EVENTS)}."

# The names of mensajero_common.webhooks.EVENTS, as a type that query validation checks.
# A test keeps the two equal.
EventFilter = Literal["sms_received", "sms_sent", "sms_delivered", "sms_failed"]


class WebhookCreate(RequestBody):
    url: WebhookURL = Field(
        description="http(s) URL whose host is a DNS name (IDNA names too) or an IP "
        "literal, without user name or password; https only in production."
    )
    secret_key: Secret | None = Field(
        default=None,
        description="HMAC key of the signatures; one is generated when left out.",
    )
    events: list[EventName] = Field(
        default=[EVENT_SMS_RECEIVED],
        min_length=1,
        max_length=len(EVENTS) * 2,
        description=_EVENTS_DESCRIPTION,
    )
    is_active: StrictBool = True


class WebhookUpdate(RequestBody):
    """Fields to change; a field left out keeps its value."""

    url: WebhookURL = Field(default=None)  # type: ignore[assignment]
    secret_key: Secret = Field(default=None)  # type: ignore[assignment]
    events: list[EventName] = Field(  # type: ignore[assignment]
        default=None,  # type: ignore[arg-type]
        min_length=1,
        max_length=len(EVENTS) * 2,
        description=_EVENTS_DESCRIPTION,
    )
    is_active: StrictBool = Field(default=None)  # type: ignore[assignment]


class WebhookPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    url: str
    events: list[str]
    is_active: bool
    disabled_reason: str | None = Field(
        description="Why the server deactivated the webhook by itself: `gone` when its "
        "endpoint responded with 410 Gone. Null unless the server deactivated it. "
        "Setting `is_active` to true clears it.",
        examples=[DISABLED_GONE],
    )
    disabled_at: datetime | None = Field(
        description="When the server deactivated the webhook; null with `disabled_reason`."
    )
    created_at: datetime
    updated_at: datetime


class WebhookWithSecret(WebhookPublic):
    """A webhook with the secret the server generated, returned once at creation."""

    secret_key: str | None = Field(
        description="Shown only now, and only when the server generated it."
    )


class WebhookList(BaseModel):
    items: list[WebhookPublic]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )
    limit: int


class WebhookListQuery(QueryParameters):
    """Query parameters of the webhook listing."""

    limit: int = Field(default=50, ge=1, le=100)
    cursor: str | None = Field(
        default=None, max_length=512, description="`next_cursor` of the previous page."
    )
    order: Literal["desc", "asc"] = Field(
        default="desc",
        description="By creation time: newest first (desc) or oldest first.",
    )
    is_active: bool | None = Field(
        default=None,
        description="true for active webhooks, false for the ones deactivated by the "
        "user or by the server.",
    )
    event: EventFilter | None = Field(
        default=None, description="Only the webhooks subscribed to this event."
    )


class WebhookDeleted(BaseModel):
    webhook_id: uuid.UUID


class WebhookTestResult(BaseModel):
    success: bool = Field(
        description="True when the endpoint responded with a 2xx status."
    )
    status_code: int | None
    duration_ms: int
    error: str | None = Field(
        description="Why no response came: timeout, connection_error: <kind> "
        "(connect_failed, tls_failed, disconnected, protocol_error), or why the URL "
        "was rejected (private_address, …)."
    )
    event_id: uuid.UUID


class AttemptPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempt_number: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    next_retry_at: datetime | None


class DeliveryPublic(BaseModel):
    id: uuid.UUID
    event_id: uuid.UUID
    event: str
    message_id: uuid.UUID | None
    status: str
    attempts: list[AttemptPublic]
    next_attempt_at: datetime | None
    last_error: str | None = Field(
        description="The error of the latest attempt that got no response (`timeout`, "
        "`connection_error: <kind>`, or why the URL was rejected, such as "
        "`private_address`), or why a cancelled delivery was not sent: `unsubscribed` "
        "(the webhook no longer takes its event) or `webhook_disabled`. Null otherwise.",
        examples=["unsubscribed"],
    )
    created_at: datetime
    completed_at: datetime | None


class DeliveryList(BaseModel):
    items: list[DeliveryPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")
    limit: int


class DeliveryListQuery(QueryParameters):
    """Query parameters of the delivery log."""

    limit: int = Field(default=50, ge=1, le=100)
    cursor: str | None = Field(
        default=None, max_length=512, description="`next_cursor` of the previous page."
    )
