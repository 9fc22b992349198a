from typing import Any

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
    params = {"limit": 50, "reset_date": "2027-01-01", "upgrade_url": "/plans"}

    assert translate("quota_exceeded_sms", "es", **params) == (
        "Tu plan permite 50 SMS al mes y ya los has enviado todos. Podrás enviar más "
        "desde el 2027-01-01 a las 00:00 UTC. Para enviar antes, pide al "
        "administrador de este servidor Mensajero un plan mayor (los planes están en "
        "/plans)."
    )
    assert translate("quota_exceeded_sms", "en", **params) == (
        "Your plan allows 50 SMS a month and you have sent them all. You can send more "
        "from 2027-01-01 at 00:00 UTC. To send sooner, ask the administrator of this "
        "Mensajero server for a larger plan (plans are listed at /plans)."
    )


@pytest.mark.parametrize(
    ("key", "params", "spanish", "english"),
    [
        (
            "quota_exceeded_devices",
            {"limit": 1},
            "Tu plan permite 1 dispositivo y ya lo tienes registrado.",
            "Your plan allows 1 device and it is already registered.",
        ),
        (
            "quota_exceeded_devices",
            {"limit": 3},
            "Tu plan permite 3 dispositivos y ya los tienes todos registrados.",
            "Your plan allows 3 devices and all of them are registered.",
        ),
        (
            "quota_exceeded_devices",
            {"limit": 0},
            "Tu plan no permite ningún dispositivo.",
            "Your plan allows no devices.",
        ),
        (
            "quota_exceeded_devices_over_limit",
            {"limit": 1, "used": 3, "to_delete": 3},
            "Tu plan permite 1 dispositivo y tienes 3 registrados, más de los que "
            "permite (por ejemplo, tras pasar a un plan menor). Para registrar otro, "
            "elimina 3 que ya no uses",
            "Your plan allows 1 device and you have 3 registered, more than it allows "
            "(after a move to a smaller plan, for example). To register another, "
            "delete 3 you no longer use",
        ),
        (
            "quota_exceeded_devices_over_limit",
            {"limit": 3, "used": 10, "to_delete": 8},
            "Tu plan permite 3 dispositivos y tienes 10 registrados,",
            "Your plan allows 3 devices and you have 10 registered,",
        ),
        (
            "quota_exceeded_sms",
            {"limit": 1},
            "Tu plan permite 1 SMS al mes y ya lo has enviado.",
            "Your plan allows 1 SMS a month and you have sent it.",
        ),
        (
            "quota_exceeded_sms_bulk",
            {"requested": 4, "available": 1},
            "Este envío necesita 4 SMS, pero este mes solo te queda 1,",
            "This send needs 4 SMS, but you have only 1 left this month,",
        ),
        (
            "quota_exceeded_sms_bulk",
            {"requested": 4, "available": 0},
            "Este envío necesita 4 SMS, pero este mes no te queda ninguno,",
            "This send needs 4 SMS, but you have none left this month,",
        ),
    ],
)
def test_translate_picks_count_variant(
    key: str, params: dict[str, Any], spanish: str, english: str
) -> None:
    params = {**params, "reset_date": "2027-01-01", "upgrade_url": "/plans"}

    assert translate(key, "es", **params).startswith(spanish)
    assert translate(key, "en", **params).startswith(english)


def test_count_variants_have_base_message() -> None:
    for key in MESSAGES:
        base, _, variant = key.partition(".")
        if variant:
            assert variant in {"zero", "one"}, key
            assert base in MESSAGES, key


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
