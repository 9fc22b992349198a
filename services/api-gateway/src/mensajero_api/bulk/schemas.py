"""Request and response bodies of bulk sending."""

import uuid
from datetime import datetime
from typing import Literal, Self

from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from mensajero_api.messages.schemas import ExpiryFields
from mensajero_api.types import PhoneNumberText, RequestBody, StorableStr
from mensajero_common.models import MessageStatus

# A recipient over the length limit rejects the whole request with a 422 instead of
# being echoed back in `rejected`.
Recipient = PhoneNumberText

BulkStatus = Literal["processing", "completed"]


class BulkMessage(RequestBody):
    to: Recipient = Field(examples=["+525512345678"])
    body: StorableStr


class BulkSendRequest(ExpiryFields):
    """Either `recipients` with one `body` for all, or `messages` with a body each."""

    recipients: list[Recipient] | None = Field(
        default=None,
        min_length=1,
        description="E.164 numbers (or national ones in the user's default region), "
        "at most BULK_MAX_RECIPIENTS (default 1000).",
        examples=[["+525512345678", "+34612345678"]],
    )
    body: StorableStr | None = Field(
        default=None,
        description="Text sent to every recipient; only with `recipients`.",
    )
    messages: list[BulkMessage] | None = Field(
        default=None,
        min_length=1,
        description="Personalised messages, each with its own recipient and body; "
        "instead of `recipients` and `body`.",
    )
    device_id: uuid.UUID | None = Field(
        default=None,
        description="Send every message from this device; left out, any online device.",
    )

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        if self.messages is not None:
            if self.recipients is not None or self.body is not None:
                raise PydanticCustomError(
                    "bulk_forms_combined",
                    "send either 'messages', or 'recipients' with 'body', not both",
                )
            return self
        if self.recipients is None:
            raise PydanticCustomError(
                "bulk_form_missing",
                "'recipients' with 'body', or 'messages', is required",
            )
        if self.body is None:
            raise PydanticCustomError(
                "bulk_body_missing", "'body' is required with 'recipients'"
            )
        return self

    def pairs(self) -> list[tuple[str, str]]:
        """Return (recipient, body) of every message asked for, in request order."""
        if self.messages is not None:
            return [(message.to, message.body) for message in self.messages]
        assert self.recipients is not None and self.body is not None
        return [(recipient, self.body) for recipient in self.recipients]


class BulkRejection(BaseModel):
    index: int = Field(description="Position in `recipients` or `messages`, from 0.")
    number: str = Field(description="The recipient as it was sent.")
    reason: str = Field(
        description="duplicate, empty_body, body_too_long, or why the number is "
        "invalid: not_a_number, missing_country_code, invalid_country_code, too_short, "
        "too_long, invalid_length, invalid_number, has_extension."
    )
    message: str = Field(description="The reason in the request's language.")
    duplicate_of: int | None = Field(
        default=None, description="For a duplicate, the index of the one that is sent."
    )


class BulkSendResult(BaseModel):
    task_id: uuid.UUID = Field(
        description="Follow progress at GET /api/v1/sms/bulk/{task_id}."
    )
    total_recipients: int = Field(
        description="Recipients in the request, rejected ones included."
    )
    accepted: int = Field(description="Messages created and charged to the quota.")
    status: BulkStatus
    message_ids: list[uuid.UUID] = Field(
        description="One per accepted recipient, in request order."
    )
    rejected: list[BulkRejection]


class BulkProgress(BaseModel):
    task_id: uuid.UUID
    status: BulkStatus = Field(
        description="processing while any message is pending, assigned or sending; "
        "completed when every message is sent, delivered, failed or expired."
    )
    total_recipients: int
    accepted: int
    counts: dict[MessageStatus, int] = Field(
        description="Messages of the task by status; every outgoing status is listed."
    )
    rejected: list[BulkRejection]
    device_id: uuid.UUID | None = Field(description="The device asked for, if any.")
    created_at: datetime


class BulkCancelResult(BulkProgress):
    cancelled: int = Field(
        description="Messages that this request cancelled; 0 when none was left to "
        "cancel."
    )
