import random
from collections import Counter

import phonenumbers
import pytest
from phonenumbers import PhoneNumber, PhoneNumberFormat, PhoneNumberType

from mensajero_common import phone
from mensajero_common.phone import PhoneNumberError, normalize_e164


@pytest.mark.parametrize(
    ("number", "region", "expected"),
    [
        ("+14155552671", None, "+14155552671"),
        ("+1 (415) 555-2671", None, "+14155552671"),
        ("5512345678", "MX", "+525512345678"),
        ("612 34 56 78", "es", "+34612345678"),
        ("+34612345678", "MX", "+34612345678"),
    ],
)
def test_normalize_e164_accepts(number: str, region: str | None, expected: str) -> None:
    assert normalize_e164(number, region) == expected


@pytest.mark.parametrize(
    ("number", "region", "reason"),
    [
        ("5512345678", None, "missing_country_code"),
        ("+999123", None, "invalid_country_code"),
        ("hello", "US", "not_a_number"),
        ("", "US", "not_a_number"),
        ("+1415555267199999", None, "too_long"),
        ("+3461", None, "too_short"),
        ("+10005550000", None, "invalid_number"),
        ("1" * 200, "US", "not_a_number"),
        ("+34 612 345 678 ext. 12", None, "has_extension"),
        ("+34612345678;ext=1", None, "has_extension"),
        ("+34 612 345 678 x99", None, "has_extension"),
        ("612 345 678 ext 12", "ES", "has_extension"),
        ("tel:+34612345678;ext=1", "ES", "has_extension"),
    ],
)
def test_normalize_e164_rejects(number: str, region: str | None, reason: str) -> None:
    with pytest.raises(PhoneNumberError) as caught:
        normalize_e164(number, region)

    assert caught.value.reason == reason
    assert caught.value.number == number


def _example_numbers() -> list[str]:
    """Return phonenumbers' example number of every region and type, in E.164."""
    numbers = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for number_type in vars(PhoneNumberType).values():
            if not isinstance(number_type, int):
                continue
            example = phonenumbers.example_number_for_type(region, number_type)
            if example is not None:
                numbers.append(
                    phonenumbers.format_number(example, PhoneNumberFormat.E164)
                )
    return numbers


def _random_numbers(count: int) -> list[str]:
    generator = random.Random(20261205)
    numbers = []
    for _ in range(count):
        digits = "".join(
            generator.choice("0123456789") for _ in range(generator.randint(2, 20))
        )
        numbers.append("+" + digits)
    # National parts that start like a national prefix ("1" in +1, "0" in +44, "8" in
    # +7) and leading zeros, which phonenumbers reads in its own way.
    numbers += ["+11" + "2" * 9, "+440" + "7" * 9, "+78" + "9" * 9, "+390612345678"]
    return numbers


def test_plain_e164_matches_parse() -> None:
    # Whenever the shortcut returns a number, phonenumbers.parse returns the same one.
    answered = 0
    for raw in _example_numbers() + _random_numbers(20000):
        read = phone._read_plain_e164(raw)
        if read is None:
            continue
        answered += 1
        country_code, national = read
        assert PhoneNumber(
            country_code=country_code, national_number=int(national)
        ) == phonenumbers.parse(raw, None), raw
    # It is a shortcut only if it reads most of these numbers itself.
    assert answered > 10000


@pytest.mark.parametrize(
    "raw",
    ["+11222222222", "+440777777777", "+390612345678", "+999123", "+1 415 555 2671"],
)
def test_plain_e164_skips_other_forms(raw: str) -> None:
    assert phone._read_plain_e164(raw) is None


def _near_example_numbers() -> list[str]:
    """Return phonenumbers' example numbers with their last digits changed, one digit
    added or one removed: numbers near the patterns, valid or not."""
    generator = random.Random(20261206)
    numbers = []
    for example in _example_numbers():
        for _ in range(4):
            prefix_length = generator.randint(max(3, len(example) - 4), len(example))
            numbers.append(
                example[:prefix_length]
                + "".join(
                    generator.choice("0123456789")
                    for _ in range(len(example) - prefix_length)
                )
            )
        numbers.append(example + generator.choice("0123456789"))
        numbers.append(example[:-1])
    return numbers


def _result_through_parse(raw: str) -> str:
    """Return what normalize_e164 returned before its shortcut: the E.164 form, or
    the reason of the rejection."""
    try:
        parsed = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException as error:
        return phone._PARSE_REASONS.get(error.error_type, "not_a_number")
    possibility = phonenumbers.is_possible_number_with_reason(parsed)
    if possibility not in phone._ACCEPTED_POSSIBILITIES:
        return phone._POSSIBILITY_REASONS.get(possibility, "invalid_number")
    if not phonenumbers.is_valid_number(parsed):
        return "invalid_number"
    return phonenumbers.format_number(parsed, PhoneNumberFormat.E164)


def test_plain_validation_matches_parse() -> None:
    # Numbers read by the shortcut get phonenumbers' own result: the same E.164 form,
    # or the same reason.
    numbers = _example_numbers() + _near_example_numbers() + _random_numbers(20000)
    outcomes: Counter[str] = Counter()
    for raw in numbers:
        if phone._read_plain_e164(raw) is None:
            continue
        try:
            result = phone.normalize_e164(raw)
        except phone.PhoneNumberError as error:
            result = error.reason
        assert result == _result_through_parse(raw), raw
        outcomes["valid" if result.startswith("+") else result] += 1
    # Every outcome is compared many times.
    assert set(outcomes) == {
        "valid",
        "invalid_number",
        "too_short",
        "too_long",
        "invalid_length",
    }
    assert min(outcomes.values()) > 100, outcomes


@pytest.mark.parametrize(
    "number", ["＋34 611 22 33 44", "＋３４６１１２２３３４４", "+٣٤٦١١٢٢٣٣٤٤"]
)
def test_normalize_e164_reads_other_scripts(number: str) -> None:
    assert normalize_e164(number) == "+34611223344"
