"""String types for request fields that end up in Postgres columns.

Their validators raise PydanticCustomError with a type of their own, which
mensajero_common.validation_messages translates.
"""

import re
import unicodedata
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from mensajero_common.text import check_display_name

_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(value: str) -> bool:
    return _SURROGATE.search(value) is not None


def is_storable(value: str) -> bool:
    """Tell whether Postgres can store `value` as UTF-8 text."""
    return "\x00" not in value and not _has_surrogate(value)


def _reject_unstorable_characters(value: str) -> str:
    # Postgres text cannot hold NUL, and a lone UTF-16 surrogate (valid in a JSON string
    # escape) cannot be encoded as UTF-8; either would fail in the database as a 500.
    if "\x00" in value:
        raise PydanticCustomError(
            "string_contains_nul", "must not contain the NUL character"
        )
    if _has_surrogate(value):
        raise PydanticCustomError(
            "string_unpaired_surrogate", "must not contain unpaired UTF-16 surrogates"
        )
    return value


def _email_problem(value: str) -> str:
    """Return the reason code of what is wrong with an address that EmailStr rejected."""
    local_part, at_sign, domain = value.strip().rpartition("@")
    if not at_sign:
        return "missing_at_sign"
    if not local_part:
        return "missing_local_part"
    if not domain:
        return "missing_domain"
    if "." not in domain:
        return "domain_without_dot"
    return "invalid"


def _classify_email_error(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # EmailStr reports every rejected address as `value_error` with email-validator's
    # English reason, so the address is checked again here for a reason code.
    try:
        return handler(value)
    except ValidationError as error:
        if not isinstance(value, str) or any(
            item["type"] != "value_error" for item in error.errors()
        ):
            raise
        raise PydanticCustomError(
            "email_invalid",
            "value is not a valid email address: {reason}",
            {"reason": _email_problem(value)},
        ) from None


Storable = AfterValidator(_reject_unstorable_characters)
"""The check of StorableStr, to put after the length constraints of a string type.

Pydantic (2.14) applies a constraint that follows a validator to the validator's
output as a generic length check, which reports `too_long` in items instead of
`string_too_long` in characters. So write
`Annotated[str, StringConstraints(max_length=64), Storable]`, never
`Annotated[StorableStr, StringConstraints(...)]` or `Annotated[StorableStr, Field(...)]`.
"""

StorableStr = Annotated[str, Storable]
"""A string that Postgres can store as UTF-8 text."""

Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=255),
    Storable,
    AfterValidator(check_display_name),
]
"""A display name, such as a user's full name or an API key's name: trimmed, 1 to 255
characters (the column size), with at least one visible character and no control
characters or bidirectional controls."""

DeviceName = Name
"""A device's name, checked as the hub checks the name in `register` frames too."""

Password = Annotated[str, StringConstraints(min_length=8, max_length=128), Storable]
"""A password of 8 to 128 characters."""

MAX_PHONE_NUMBER_LENGTH = 64

PhoneNumberText = Annotated[
    str, StringConstraints(max_length=MAX_PHONE_NUMBER_LENGTH), Storable
]
"""A phone number as the client wrote it, before it is read as E.164.

64 characters hold any written form of a number, with spaces, dashes, brackets or an
extension. A longer value is rejected before it is parsed or echoed back in an error.
"""


def fold_compatibility_forms(value: Any) -> Any:
    """Normalize a string to NFKC, which maps look-alike compatibility characters to
    their plain forms: fullwidth "ｋ" to "k", the ligature "ﬁ" to "fi"."""
    if isinstance(value, str):
        return unicodedata.normalize("NFKC", value)
    return value


_CheckedEmail = Annotated[EmailStr, WrapValidator(_classify_email_error)]

# email-validator normalizes to NFC only, which keeps "ｋ@example.com" apart from
# "k@example.com". NFKC runs first, so that email-validator checks the folded address.
Email = Annotated[_CheckedEmail, BeforeValidator(fold_compatibility_forms)]
"""An email address in NFKC, then checked and normalized by email-validator as EmailStr
does."""

_EMAIL_ADAPTER: TypeAdapter[str] = TypeAdapter(Email)
_PRE_NFKC_EMAIL_ADAPTER: TypeAdapter[str] = TypeAdapter(_CheckedEmail)


def normalize_email(value: str) -> str:
    """Return an email address as sign-up stores it, or `value` itself if it is invalid.

    Sign-up trims the address, normalizes it to NFKC, converts an IDNA (xn--) domain
    to Unicode and lower-cases the domain. A login, or FIRST_SUPERUSER, written in
    another of these spellings must go through the same steps to find the account.
    """
    try:
        return _EMAIL_ADAPTER.validate_python(value)
    except ValidationError:
        return value


def normalize_email_before_nfkc(value: str) -> str:
    """Return an email address as sign-up stored it before it applied NFKC, or `value`
    itself if it is invalid.

    Migration 0016 kept a few addresses in that form, and get_user_by_email describes
    how login finds them.
    """
    try:
        return _PRE_NFKC_EMAIL_ADAPTER.validate_python(value)
    except ValidationError:
        return value


class RequestBody(BaseModel):
    """A JSON request body: a field it does not define gets 422 `extra_forbidden`.

    Ignoring unknown fields would turn a typo (`tll` for `ttl`) or a field the caller
    may not set (`is_superuser`) into a silent success.
    """

    model_config = ConfigDict(extra="forbid")


class QueryParameters(BaseModel):
    """The query parameters of a listing: one it does not define gets 422
    `extra_forbidden`, as an unknown body field does.

    Ignoring an unknown parameter would turn a typo (`stauts=failed`) into an unfiltered
    listing that looks like a filtered one.
    """

    model_config = ConfigDict(extra="forbid")
