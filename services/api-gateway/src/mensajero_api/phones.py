"""Phone numbers from requests, normalized to E.164 or rejected with a 400."""

from mensajero_common.errors import ValidationFailedError
from mensajero_common.phone import PhoneNumberError, normalize_e164


class InvalidPhoneNumberError(ValidationFailedError):
    code = "invalid_phone_number"

    def __init__(self, number: str, reason: str) -> None:
        super().__init__(
            # A blank number would read "The number  is invalid", so it has a message
            # of its own; the code and the reason stay those of any invalid number.
            message_key=None if number.strip() else "phone_number_blank",
            number=number,
            reason=reason,
            details={"number": number, "reason": reason},
        )


def normalize_phone_number(number: str, default_region: str | None) -> str:
    """Return `number` in E.164, reading a national number in `default_region`, or raise.

    `reason` in the error is phone.py's machine code, e.g. missing_country_code when a
    national number arrives and the user has no default region.
    """
    try:
        return normalize_e164(number, default_region)
    except PhoneNumberError as error:
        raise InvalidPhoneNumberError(number, error.reason) from None
