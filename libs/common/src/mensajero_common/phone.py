"""Phone number normalisation to E.164 with the phonenumbers library."""

import functools
import re
from dataclasses import dataclass, field

import phonenumbers
from phonenumbers import (
    COUNTRY_CODE_TO_REGION_CODE,
    NumberParseException,
    PhoneMetadata,
    PhoneNumber,
    PhoneNumberDesc,
    PhoneNumberFormat,
    ValidationResult,
)


@dataclass
class PhoneNumberError(ValueError):
    """A number that cannot be read; `reason` is a machine code, `number` the input."""

    number: str
    reason: str

    def __str__(self) -> str:
        return f"invalid phone number {self.number!r}: {self.reason}"


_PARSE_REASONS = {
    NumberParseException.INVALID_COUNTRY_CODE: "invalid_country_code",
    NumberParseException.NOT_A_NUMBER: "not_a_number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too_short",
    NumberParseException.TOO_SHORT_NSN: "too_short",
    NumberParseException.TOO_LONG: "too_long",
}

_POSSIBILITY_REASONS = {
    ValidationResult.INVALID_COUNTRY_CODE: "invalid_country_code",
    ValidationResult.TOO_SHORT: "too_short",
    ValidationResult.TOO_LONG: "too_long",
    ValidationResult.INVALID_LENGTH: "invalid_length",
}

MAX_INPUT_LENGTH = 64
# Signs that start an international number: "+", and the fullwidth plus that some
# keyboards and phones write, which phonenumbers reads the same way.
PLUS_SIGNS = ("+", "\uff0b")

# A number written as E.164 spells it: "+", then ASCII digits only, the first not 0.
_PLAIN_E164 = re.compile(r"\+[1-9][0-9]{2,19}")
# phonenumbers' bounds: a country code has at most 3 digits, and a national number
# from 2 to 17.
_MAX_COUNTRY_CODE_DIGITS = 3
_MIN_NATIONAL_DIGITS = 2
_MAX_NATIONAL_DIGITS = 17


def normalize_e164(number: str, default_region: str | None = None) -> str:
    """Return `number` in E.164 form, or raise PhoneNumberError.

    A number with a leading "+" (or a fullwidth "＋") is read as international. Any
    other number is read as a national number of `default_region`, and rejected with
    reason `missing_country_code` when there is no region, rather than guessed into
    some country.
    """
    raw = number.strip()
    if not raw or len(raw) > MAX_INPUT_LENGTH:
        raise PhoneNumberError(number, "not_a_number")

    region = default_region.upper() if default_region else None
    international = raw.startswith(PLUS_SIGNS)
    if not international and region is None:
        raise PhoneNumberError(number, "missing_country_code")
    try:
        return _parse_e164(raw, None if international else region)
    except PhoneNumberError as error:
        raise PhoneNumberError(number, error.reason) from None


# Validating one number through phonenumbers.parse takes about 17 µs on an idle core,
# and a number in "+<digits>" form about 3 µs through the compiled checks below. The
# same recipients come back in every campaign and every one-time code, so valid numbers
# are cached. Invalid ones are read again, because lru_cache does not cache exceptions.
@functools.lru_cache(maxsize=16384)
def _parse_e164(raw: str, region: str | None) -> str:
    plain = _read_plain_e164(raw) if region is None else None
    if plain is not None:
        country_code, national = plain
        _check_possible(raw, _length_possibility(country_code, len(national)))
        if not _is_valid_plain(country_code, national):
            raise PhoneNumberError(raw, "invalid_number")
        # "+<digits>" with no leading zero in the national part is the E.164 form.
        return raw

    try:
        parsed = phonenumbers.parse(raw, region)
    except NumberParseException as error:
        raise PhoneNumberError(
            raw, _PARSE_REASONS.get(error.error_type, "not_a_number")
        ) from None
    # phonenumbers reads "ext. 12", " x12" or ";ext=12" as an extension, which the E.164
    # form leaves out. An SMS cannot reach an extension, so such a number is rejected
    # rather than sent to the main line.
    if parsed.extension:
        raise PhoneNumberError(raw, "has_extension")
    _check_possible(raw, phonenumbers.is_possible_number_with_reason(parsed))
    if not phonenumbers.is_valid_number(parsed):
        raise PhoneNumberError(raw, "invalid_number")
    return phonenumbers.format_number(parsed, PhoneNumberFormat.E164)


def _check_possible(raw: str, possibility: int) -> None:
    if possibility not in _ACCEPTED_POSSIBILITIES:
        raise PhoneNumberError(
            raw, _POSSIBILITY_REASONS.get(possibility, "invalid_number")
        )


def _read_plain_e164(raw: str) -> tuple[int, str] | None:
    """Read "+<digits>" as phonenumbers.parse does, into its country code and national
    number, or return None to leave it to parse.

    Most recipients come in this form, and parse spends half of a number's validation
    on what only other forms need: extensions, "tel:" URIs, punctuation and other
    scripts' digits. Here a number is left to parse whenever parse could read it
    differently: no known country code, a national number outside parse's bounds or
    with a leading zero, or one that starts like the country's national prefix.
    """
    if _PLAIN_E164.fullmatch(raw) is None:
        return None
    digits = raw[1:]
    for length in range(1, _MAX_COUNTRY_CODE_DIGITS + 1):
        country_code = int(digits[:length])
        if country_code in COUNTRY_CODE_TO_REGION_CODE:
            break
    else:
        return None
    national = digits[length:]
    if (
        not _MIN_NATIONAL_DIGITS <= len(national) <= _MAX_NATIONAL_DIGITS
        or national[0] == "0"
    ):
        return None
    if _main_metadata(country_code) is None:
        return None
    national_prefix = _national_prefix(country_code)
    if national_prefix is not None and national_prefix.match(national):
        return None
    return country_code, national


@functools.cache
def _main_metadata(country_code: int) -> PhoneMetadata | None:
    return PhoneMetadata.metadata_for_region_or_calling_code(
        country_code, phonenumbers.region_code_for_country_code(country_code)
    )


@functools.cache
def _national_prefix(country_code: int) -> re.Pattern[str] | None:
    """Return the compiled national prefix of a country code's main region, if any."""
    metadata = _main_metadata(country_code)
    prefix = metadata.national_prefix_for_parsing if metadata else None
    return re.compile(prefix) if prefix else None


_ACCEPTED_POSSIBILITIES = (
    ValidationResult.IS_POSSIBLE,
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
)
# The number types that phonenumbers tries, in its order, when it checks whether a
# number is valid (phonenumberutil._number_type_helper). A valid number matches one.
_TYPE_DESCRIPTIONS = (
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
    "fixed_line",
    "mobile",
)


@dataclass(frozen=True)
class _DescriptionCheck:
    """One PhoneNumberDesc as phonenumbers matches it: lengths first, then pattern."""

    lengths: frozenset[int]
    pattern: re.Pattern[str]

    @classmethod
    def from_description(
        cls, description: PhoneNumberDesc | None
    ) -> "_DescriptionCheck | None":
        if description is None or not description.national_number_pattern:
            return None
        return cls(
            frozenset(description.possible_length),
            re.compile(description.national_number_pattern),
        )

    def matches(self, national: str) -> bool:
        if self.lengths and len(national) not in self.lengths:
            return False
        return self.pattern.fullmatch(national) is not None


@dataclass(frozen=True)
class _RegionCheck:
    """The validity rules of one region's metadata, compiled once.

    phonenumbers tries each number type's description in turn. Here the descriptions
    that allow a length are joined into one pattern, built on the first number of that
    length.
    """

    general: _DescriptionCheck | None
    types: tuple[_DescriptionCheck, ...]
    leading_digits: re.Pattern[str] | None
    _types_by_length: dict[int, re.Pattern[str] | None] = field(
        default_factory=dict, compare=False, repr=False
    )

    def is_valid(self, national: str) -> bool:
        if self.general is None or not self.general.matches(national):
            return False
        length = len(national)
        try:
            types = self._types_by_length[length]
        except KeyError:
            types = self._types_by_length[length] = self._join_types(length)
        return types is not None and types.fullmatch(national) is not None

    def _join_types(self, length: int) -> re.Pattern[str] | None:
        patterns = [
            f"(?:{check.pattern.pattern})"
            for check in self.types
            if not check.lengths or length in check.lengths
        ]
        return re.compile("|".join(patterns)) if patterns else None


@functools.cache
def _region_check(country_code: int, region: str) -> _RegionCheck | None:
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    if metadata is None:
        return None
    # phonenumbers skips the mobile description when its pattern is the fixed line's.
    names = [
        name
        for name in _TYPE_DESCRIPTIONS
        if name != "mobile" or not metadata.same_mobile_and_fixed_line_pattern
    ]
    types = (
        _DescriptionCheck.from_description(getattr(metadata, name)) for name in names
    )
    return _RegionCheck(
        general=_DescriptionCheck.from_description(metadata.general_desc),
        types=tuple(check for check in types if check is not None),
        leading_digits=re.compile(metadata.leading_digits)
        if metadata.leading_digits
        else None,
    )


@functools.cache
def _length_possibility(country_code: int, length: int) -> int:
    """Return phonenumbers' ValidationResult for a national number of `length` digits.

    It depends on the length alone, so phonenumbers is asked once per length.
    """
    sample = PhoneNumber(country_code=country_code, national_number=int("9" * length))
    return phonenumbers.is_possible_number_with_reason(sample)


def _is_valid_plain(country_code: int, national: str) -> bool:
    """Return whether phonenumbers.is_valid_number accepts a number, for a national
    number with no leading zero. It is several times faster than that function.

    Where several regions share the country code, the number belongs to the first one
    whose leading digits it starts with, or else to the first in which it is valid,
    as phonenumbers.region_code_for_number decides.
    """
    regions = COUNTRY_CODE_TO_REGION_CODE.get(country_code, ())
    if len(regions) == 1:
        check = _region_check(country_code, regions[0])
        return check is not None and check.is_valid(national)
    for region in regions:
        check = _region_check(country_code, region)
        if check is None:
            continue
        if check.leading_digits is not None:
            if check.leading_digits.match(national):
                return check.is_valid(national)
        elif check.is_valid(national):
            return True
    return False


def is_valid_region(region: str) -> bool:
    return region.upper() in phonenumbers.SUPPORTED_REGIONS
