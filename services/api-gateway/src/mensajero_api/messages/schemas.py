"""Request and response bodies of sending and reading messages."""

import re
import uuid
from datetime import date, datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    StrictInt,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from mensajero_api.types import (
    PhoneNumberText,
    QueryParameters,
    RequestBody,
    StorableStr,
)
from mensajero_common.models import MessageStatus, MessageType, SMSMessage

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50


# The longest `ttl` accepted, in seconds (30 days); a later expiry is no expiry in practice.
MAX_TTL_S = 30 * 24 * 3600


class ExpiryFields(RequestBody):
    """Optional expiry of a send: a message not sent by then becomes `expired`."""

    ttl: StrictInt | None = Field(
        default=None,
        gt=0,
        le=MAX_TTL_S,
        description="Seconds from now after which the message is not sent any more.",
    )
    expires_at: datetime | None = Field(
        default=None,
        description="Time after which the message is not sent any more (ISO 8601; "
        "without an offset, UTC), at most 30 days ahead. Not together with `ttl`.",
    )


class SendRequest(ExpiryFields):
    to: PhoneNumberText = Field(
        description="Recipient: E.164 (+525512345678), or national in the user's default "
        "region; at most 64 characters.",
        examples=["+525512345678"],
    )
    body: StorableStr = Field(
        description="Text of the SMS, at most SMS_MAX_BODY_LENGTH characters (default 1600)."
    )
    device_id: uuid.UUID | None = Field(
        default=None,
        description="Send from this device; left out, any online device of the user sends it.",
    )


class SendResult(BaseModel):
    message_id: uuid.UUID
    status: MessageStatus
    to: str = Field(description="The recipient in E.164.")
    segments: int = Field(description="SMS parts the body takes.")
    encoding: str = Field(description="gsm7 or ucs2.")


class MessagePublic(BaseModel):
    id: uuid.UUID
    type: MessageType
    status: MessageStatus
    to: str | None
    from_: str | None = Field(serialization_alias="from")
    body: str
    segments: int
    encoding: str
    device_id: uuid.UUID | None
    error: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    assigned_at: datetime | None
    sending_at: datetime | None
    sent_at: datetime | None
    delivered_at: datetime | None
    failed_at: datetime | None
    received_at: datetime | None
    expires_at: datetime | None

    @classmethod
    def from_model(cls, message: SMSMessage) -> "MessagePublic":
        return cls(
            id=message.id,
            type=message.type,
            status=message.status,
            to=message.to_number,
            from_=message.from_number,
            body=message.body,
            segments=message.segments,
            encoding=message.encoding,
            device_id=message.device_id,
            error=message.error,
            attempts=message.attempts,
            created_at=message.created_at,
            updated_at=message.updated_at,
            assigned_at=message.assigned_at,
            sending_at=message.sending_at,
            sent_at=message.sent_at,
            delivered_at=message.delivered_at,
            failed_at=message.failed_at,
            received_at=message.received_at,
            expires_at=message.expires_at,
        )


class MessagePage(BaseModel):
    items: list[MessagePublic]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )
    limit: int


# A time followed by a space and a UTC offset, where the offset's "+" was lost.
_UNENCODED_PLUS_OFFSET = re.compile(r"^(.+[T ][\d:.]+) (\d{2}(?::?\d{2})?)$")


class MessageListQuery(QueryParameters):
    """Query parameters of the message listings."""

    limit: int = Field(default=DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE)
    cursor: str | None = Field(
        default=None, max_length=512, description="`next_cursor` of the previous page."
    )
    order: Literal["desc", "asc"] = Field(
        default="desc",
        description="By creation time: newest first (desc) or oldest first.",
    )
    status: list[MessageStatus] | None = Field(
        default=None, description="Repeat to match any of several statuses."
    )
    type: MessageType | None = None
    device_id: uuid.UUID | None = None
    phone: str | None = Field(
        default=None,
        max_length=64,
        description="Matches the recipient or the sender; read like `to` of a send.",
    )
    date_from: datetime | date | None = Field(
        default=None,
        description="Created at or after this instant; a bare date means its midnight UTC.",
    )
    date_to: datetime | date | None = Field(
        default=None,
        description="Created at or before this instant; a bare date includes that whole day (UTC).",
    )

    @field_validator("date_from", "date_to", mode="wrap")
    @classmethod
    def _read_date_or_datetime(
        cls, value: Any, handler: ValidatorFunctionWrapHandler
    ) -> Any:
        # A "+" written unencoded in a query string arrives as a space, so
        # 2026-12-06T01:00:00+01:00 arrives as 2026-12-06T01:00:00 01:00.
        if isinstance(value, str):
            value = _UNENCODED_PLUS_OFFSET.sub(r"\1+\2", value)
        # Kept a date, not midnight, so that date_to=2024-01-31 can include all of that day.
        if isinstance(value, str) and len(value) == len("YYYY-MM-DD"):
            try:
                return date.fromisoformat(value)
            except ValueError:
                pass
        # The union would report one error per member, each under a loc of its own, so
        # a single error replaces them.
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "date_or_datetime_parsing",
                "Input should be a date (YYYY-MM-DD) or an ISO 8601 datetime",
            ) from None


class IncomingListQuery(MessageListQuery):
    """Query parameters of the listing of received SMS, where `type` can only be incoming.

    A contradicting `type=outgoing` is rejected: ignoring it would return incoming
    messages to a caller who asked for outgoing ones.
    """

    type: Literal[MessageType.INCOMING] | None = Field(
        default=None,
        description="Only `incoming`: for outgoing messages use GET /api/v1/sms/messages.",
    )

    @field_validator("type", mode="wrap")
    @classmethod
    def _reject_other_types(
        cls, value: Any, handler: ValidatorFunctionWrapHandler
    ) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "incoming_listing_type",
                "This listing contains only incoming messages",
            ) from None
