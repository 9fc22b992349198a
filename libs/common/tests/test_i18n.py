import pytest

from mensajero_common.i18n import MESSAGES, negotiate_language, translate


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "es"),
        ("", "es"),
        ("en", "en"),
        ("en-US,en;q=0.9", "en"),
        ("fr-FR, en;q=0.5", "en"),
        ("fr, de", "es"),
        ("es;q=0.4, en;q=0.8", "en"),
        ("en;q=0, es", "es"),
        ("en;q=abc", "es"),
        ("es-MX", "es"),
    ],
)
def test_negotiate_language(header: str | None, expected: str) -> None:
    assert negotiate_language(header) == expected


def test_every_message_has_both_languages() -> None:
    for key, templates in MESSAGES.items():
        assert set(templates) == {"es", "en"}, key


def test_translate_formats_fields() -> None:
    assert (
        translate("quota_exceeded_sms", "es", limit=50)
        == "Has alcanzado el límite de 50 SMS este mes"
    )
    assert (
        translate("quota_exceeded_sms", "en", limit=50)
        == "You have reached the limit of 50 SMS this month"
    )
