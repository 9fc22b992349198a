"""The response envelope of every endpoint, and the schemas of its error bodies.

Success: `{"success": true, "data": …, "message": …}`; failure:
`{"success": false, "error": "<machine code>", "message": "<localized text>", …details}`.
The error schemas here only document the bodies in OpenAPI; the handlers in `errors.py`
build them with mensajero_common.error_responses.
"""

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

DataT = TypeVar("DataT")


class Envelope(BaseModel, Generic[DataT]):
    success: Literal[True] = True
    data: DataT
    message: str | None = Field(
        default=None, description="Confirmation in the request's language."
    )


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    success: Literal[False] = False
    error: str = Field(description="Machine code, always English.")
    message: str = Field(description="Explanation in the request's language.")


class ValidationErrorItem(BaseModel):
    field: str = Field(
        description="Dotted path of the invalid field; `body` for the body as a whole."
    )
    location: str | None = Field(description="body, query, path or header.")
    message: str = Field(description="What is wrong, in the request's language.")
    type: str = Field(
        description="Machine code: pydantic's error type (e.g. missing, "
        "string_too_short) or one of the API's own (e.g. email_invalid)."
    )
    reason: str | None = Field(
        default=None,
        description="Machine code of the problem, for types that have several "
        "(email_invalid: missing_at_sign, missing_local_part, missing_domain, "
        "domain_without_dot, invalid).",
    )
    position: int | None = Field(
        default=None,
        description="json_invalid only: character index of the syntax error, from 0.",
    )
    line: int | None = Field(
        default=None, description="json_invalid only: line of the error, from 1."
    )
    column: int | None = Field(
        default=None, description="json_invalid only: column of the error, from 1."
    )


class ValidationErrorBody(ErrorBody):
    details: list[ValidationErrorItem]


class QuotaErrorBody(ErrorBody):
    error: Literal["quota_exceeded"] = Field(
        description="Machine code, always English."
    )
    quota_type: Literal["sms_monthly", "devices"]
    limit: int
    used: int
    available: int
    reset_date: str | None = Field(
        description="Day of the next monthly reset (YYYY-MM-DD, UTC); null for device "
        "slots, which come back when a device is deleted."
    )
    reset_at: str | None = Field(
        description="Moment of the next monthly reset, ISO 8601 in UTC; null for device "
        "slots."
    )
    upgrade_url: str


class RateLimitedErrorBody(ErrorBody):
    error: Literal["rate_limited"] = Field(description="Machine code, always English.")
    limit: str = Field(description="The limit that was reached, such as 20/minute.")
    retry_after: int = Field(
        description="Seconds to wait before repeating the request, as in Retry-After."
    )


class TooManyLoginAttemptsErrorBody(ErrorBody):
    error: Literal["too_many_login_attempts"] = Field(
        description="Machine code, always English."
    )
    retry_after: int = Field(
        description="Seconds to wait before trying again, as in Retry-After."
    )


class ServiceUnavailableErrorBody(ErrorBody):
    error: Literal["service_unavailable"] = Field(
        description="Machine code, always English."
    )


def error_responses(
    *status_codes: int, quota: bool = False, login_throttle: bool = False
) -> dict[int | str, dict[str, Any]]:
    """Describe the error bodies of `status_codes` for a route's OpenAPI `responses`.

    Every API route may also return 429 `rate_limited` and 503 `service_unavailable`, so
    both are always described. With `quota`, the 429 may be `quota_exceeded` too; with
    `login_throttle`, `too_many_login_attempts`.
    """
    too_many: Any = RateLimitedErrorBody
    if quota:
        too_many = QuotaErrorBody | too_many
    if login_throttle:
        too_many = TooManyLoginAttemptsErrorBody | too_many
    models: dict[int, Any] = {
        422: ValidationErrorBody,
        429: too_many,
        503: ServiceUnavailableErrorBody,
    }
    codes = sorted({*status_codes, 429, 503})
    return {code: {"model": models.get(code, ErrorBody)} for code in codes}
