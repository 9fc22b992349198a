import pytest

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
    ],
)
def test_normalize_e164_rejects(number: str, region: str | None, reason: str) -> None:
    with pytest.raises(PhoneNumberError) as caught:
        normalize_e164(number, region)

    assert caught.value.reason == reason
    assert caught.value.number == number
