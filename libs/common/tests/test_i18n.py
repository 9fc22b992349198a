import pytest

from mensajero_common.i18n import (
    MESSAGES,
    negotiate_language,
    rate_limit_phrase,
    translate,
)


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


@pytest.mark.parametrize(
    ("limit", "spanish", "english"),
    [
        ("20/minute", "20 por minuto", "20 per minute"),
        ("100/2 hours", "100 cada 2 horas", "100 per 2 hours"),
        ("20/s", "20 por segundo", "20 per second"),
        ("10/day", "10 por día", "10 per day"),
        ("lots", "lots", "lots"),
    ],
)
def test_rate_limit_phrase_per_language(limit: str, spanish: str, english: str) -> None:
    assert rate_limit_phrase(limit, "es") == spanish
    assert rate_limit_phrase(limit, "en") == english
