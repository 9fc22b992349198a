"""Reasons in error messages: a localized phrase in the message, the code in `reason`."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from api_test_helpers import ApiUser, MakeUser, send_sms
from httpx import ASGITransport, AsyncClient
from security_helpers import create_api_key, key_headers
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.main import create_app
from mensajero_common import protocol
from mensajero_common.i18n import REASONS
from mensajero_common.models import UserApiKey
from mensajero_common.settings import Environment, Settings

ES = {"Accept-Language": "es"}
EN = {"Accept-Language": "en"}
WEBHOOKS_URL = "/api/v1/sms/webhooks"

# number sent without a default region -> (reason, Spanish phrase, English phrase)
PHONE_CASES = {
    "hello": (
        "missing_country_code",
        "no lleva prefijo internacional (+ y el código de país) y tu cuenta no "
        "tiene región por defecto",
        "it has no international prefix (+ and the country code), and your "
        "account has no default region",
    ),
    "+hello": (
        "not_a_number",
        "no es un número de teléfono",
        "it is not a phone number",
    ),
    "+999123456789": (
        "invalid_country_code",
        "el código de país no existe",
        "the country code does not exist",
    ),
    "+52123": ("too_short", "tiene muy pocos dígitos", "it has too few digits"),
    "+52551234567890": (
        "too_long",
        "tiene demasiados dígitos",
        "it has too many digits",
    ),
    "+402222222": (
        "invalid_length",
        "ningún número de ese país tiene esa cantidad de dígitos",
        "no number of that country has that many digits",
    ),
    "+491234567890": (
        "invalid_number",
        "no es un número válido en ese país",
        "it is not a valid number in that country",
    ),
    "+34 612 345 678 ext. 12": (
        "has_extension",
        "lleva una extensión (ext., x o ;ext=), y un SMS no puede llegar a una "
        "extensión; escribe el número sin ella",
        "it has an extension (ext., x or ;ext=), and an SMS cannot reach an "
        "extension; write the number without it",
    ),
}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Each test makes many requests in a row.
    return settings.model_copy(update={"RATE_LIMIT_ENABLED": False})


def phone_message(number: str, phrase: str, language: str) -> str:
    if language == "es":
        return (
            f"El número {number} no es válido: {phrase}. "
            "Usa el formato E.164, por ejemplo +525512345678."
        )
    return (
        f"The number {number} is invalid: {phrase}. "
        "Use the E.164 format, for example +525512345678."
    )


async def test_send_phone_reasons_localized(client: AsyncClient, user: ApiUser) -> None:
    for number, (reason, spanish, english) in PHONE_CASES.items():
        default = await send_sms(client, user, to=number)
        english_response = await send_sms(client, user, to=number, headers=EN)

        assert default.status_code == 400, number
        assert default.json()["error"] == "invalid_phone_number"
        assert default.json()["reason"] == reason
        assert default.json()["message"] == phone_message(number, spanish, "es")
        assert english_response.json()["reason"] == reason
        assert english_response.json()["message"] == phone_message(
            number, english, "en"
        )


async def test_device_phone_reason_localized(
    client: AsyncClient, user: ApiUser
) -> None:
    responses = {
        language: await client.post(
            "/api/v1/sms/devices",
            json={"name": "Pixel", "phone_number": "+52123"},
            headers={**user.headers, "Accept-Language": language},
        )
        for language in ("es", "en")
    }

    assert responses["es"].status_code == 400
    assert responses["es"].json()["reason"] == "too_short"
    assert responses["es"].json()["message"] == phone_message(
        "+52123", "tiene muy pocos dígitos", "es"
    )
    assert responses["en"].json()["message"] == phone_message(
        "+52123", "it has too few digits", "en"
    )


async def test_bulk_rejections_localized(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user(plan="pro")
    messages = [{"to": "+525512340001", "body": "Hola"}]
    messages += [{"to": number, "body": "Hola"} for number in PHONE_CASES]
    messages += [
        {"to": "+525512340001", "body": "Hola"},
        {"to": "+525512340002", "body": "  "},
        {"to": "+525512340003", "body": "x" * 1601},
    ]

    responses = {
        language: await client.post(
            "/api/v1/sms/send-bulk",
            json={"messages": messages},
            headers={**owner.headers, "Accept-Language": language},
        )
        for language in ("es", "en")
    }

    for language, response in responses.items():
        assert response.status_code == 201, response.text
        rejected = response.json()["data"]["rejected"]
        by_index = {item["index"]: item for item in rejected}
        for index, (number, (reason, spanish, english)) in enumerate(
            PHONE_CASES.items(), start=1
        ):
            phrase = spanish if language == "es" else english
            assert by_index[index]["reason"] == reason, (language, number)
            assert by_index[index]["message"] == phone_message(number, phrase, language)
        first_other = len(PHONE_CASES) + 1
        duplicate, empty, too_long = (by_index[first_other + i] for i in range(3))
        assert duplicate["reason"] == "duplicate"
        assert duplicate["duplicate_of"] == 0
        assert empty["reason"] == "empty_body"
        assert too_long["reason"] == "body_too_long"

    spanish_rejected = responses["es"].json()["data"]["rejected"]
    english_rejected = responses["en"].json()["data"]["rejected"]
    assert [item["message"] for item in spanish_rejected[-3:]] == [
        "Repite el destinatario de la posición 0; se envía una sola vez.",
        "El texto del mensaje está vacío o solo contiene espacios o caracteres invisibles.",
        "El texto tiene 1601 caracteres; el máximo es 1600.",
    ]
    assert [item["message"] for item in english_rejected[-3:]] == [
        "Repeats the recipient at position 0; it is sent only once.",
        "The message body is empty or contains only whitespace or invisible characters.",
        "The body has 1601 characters; the maximum is 1600.",
    ]


async def test_bulk_all_rejected_localized(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user(plan="pro")

    response = await client.post(
        "/api/v1/sms/send-bulk",
        json={"recipients": ["+52123"], "body": "Hola"},
        headers={**owner.headers, **EN},
    )

    assert response.status_code == 400
    assert response.json()["error"] == "no_valid_recipients"
    assert response.json()["rejected"][0]["reason"] == "too_short"
    assert response.json()["rejected"][0]["message"] == phone_message(
        "+52123", "it has too few digits", "en"
    )


async def test_webhook_url_reasons_localized(
    client: AsyncClient, user: ApiUser
) -> None:
    cases = {
        "ftp://example.com/x": (
            "unsupported_scheme",
            "su esquema no es http ni https",
            "its scheme is neither http nor https",
        ),
        "https://user:pw@example.com": (
            "credentials_in_url",
            "lleva usuario o contraseña",
            "it contains a user name or password",
        ),
        "http:///hook": ("missing_host", "no tiene host", "it has no host"),
        "http://example.com:99999/hook": (
            "invalid_url",
            "no es una URL válida",
            "it is not a valid URL",
        ),
    }

    for url, (reason, spanish, english) in cases.items():
        default = await client.post(
            WEBHOOKS_URL, json={"url": url}, headers=user.headers
        )
        english_response = await client.post(
            WEBHOOKS_URL, json={"url": url}, headers={**user.headers, **EN}
        )

        assert default.status_code == 400, url
        assert default.json()["reason"] == reason
        assert default.json()["message"].startswith(
            f"La URL del webhook {url} no se puede usar: {spanish}. Debe ser"
        )
        assert english_response.json()["reason"] == reason
        assert english_response.json()["message"].startswith(
            f"The webhook URL {url} cannot be used: {english}. It must be"
        )


async def test_webhook_url_reasons_in_production(
    settings: Settings, user: ApiUser
) -> None:
    production = settings.model_copy(update={"ENVIRONMENT": Environment.PRODUCTION})
    application = create_app(production)
    cases = {
        "http://127.0.0.1:9/hook": (
            "https_required",
            "en producción solo se admite https",
            "production accepts only https",
        ),
        "https://169.254.169.254/latest": (
            "private_address",
            "su host apunta a una dirección privada, de loopback o reservada",
            "its host resolves to a private, loopback or reserved address",
        ),
    }

    async with (
        application.router.lifespan_context(application),
        AsyncClient(
            transport=ASGITransport(app=application), base_url="http://testserver"
        ) as production_client,
    ):
        for url, (reason, spanish, english) in cases.items():
            default = await production_client.post(
                WEBHOOKS_URL, json={"url": url}, headers=user.headers
            )
            english_response = await production_client.post(
                WEBHOOKS_URL, json={"url": url}, headers={**user.headers, **EN}
            )

            assert default.status_code == 400, url
            assert default.json()["reason"] == reason
            assert f"no se puede usar: {spanish}." in default.json()["message"]
            assert english_response.json()["reason"] == reason
            assert f"cannot be used: {english}." in english_response.json()["message"]


async def test_webhook_secret_reasons_localized(
    client: AsyncClient, user: ApiUser
) -> None:
    cases = {
        "short": (
            "length",
            "su longitud está fuera del rango admitido",
            "its length is outside the allowed range",
        ),
        "whsec_!!!not base64!!!xxxxxxxx": (
            "whsec_not_base64",
            "lo que sigue a whsec_ no es base64 válido",
            "the part after whsec_ is not valid base64",
        ),
        " " * 20: (
            "blank",
            "está vacío o solo tiene espacios o caracteres invisibles",
            "it is empty or contains only whitespace or invisible characters",
        ),
        "tab\tsecret-longer-than-16": (
            "control_character",
            "contiene un carácter de control (U+0000 a U+001F, U+007F a U+009F), "
            "como un tabulador o un salto de línea",
            "it contains a control character (U+0000 to U+001F, U+007F to U+009F), "
            "such as a tab or a line break",
        ),
        "secret-longer-than-16 ": (
            "surrounding_whitespace",
            "empieza o termina con un espacio en blanco o un carácter invisible",
            "it starts or ends with whitespace or an invisible character",
        ),
        "secret-longer-than-16\u200b": (
            "surrounding_whitespace",
            "empieza o termina con un espacio en blanco o un carácter invisible",
            "it starts or ends with whitespace or an invisible character",
        ),
    }

    for secret, (reason, spanish, english) in cases.items():
        payload = {"url": "http://127.0.0.1:9/hook", "secret_key": secret}
        default = await client.post(WEBHOOKS_URL, json=payload, headers=user.headers)
        english_response = await client.post(
            WEBHOOKS_URL, json=payload, headers={**user.headers, **EN}
        )

        assert default.status_code == 400, secret
        assert default.json()["reason"] == reason
        assert default.json()["message"].startswith(
            f"El secret_key no es válido: {spanish}. Debe tener entre 16 y 255"
        )
        assert english_response.json()["reason"] == reason
        assert english_response.json()["message"].startswith(
            f"The secret_key is invalid: {english}. It must have 16 to 255"
        )


async def test_api_key_reasons_localized(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    revoked = await create_api_key(client, user, name="revoked")
    await client.delete(
        f"/api/v1/users/me/api-keys/{revoked['id']}", headers=user.headers
    )
    expired = await create_api_key(client, user, name="expired", expires_in_days=1)
    async with session_factory() as session:
        await session.execute(
            update(UserApiKey)
            .where(UserApiKey.id == uuid.UUID(expired["id"]))
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        await session.commit()
    cases = {
        "mak_" + "A" * 43: ("unknown", "no existe", "it does not exist"),
        revoked["api_key"]: ("revoked", "fue revocada", "it was revoked"),
        expired["api_key"]: ("expired", "ha caducado", "it has expired"),
    }

    for value, (reason, spanish, english) in cases.items():
        default = await client.get("/api/v1/users/me", headers=key_headers(value))
        english_response = await client.get(
            "/api/v1/users/me", headers={**key_headers(value), **EN}
        )

        assert default.status_code == 401, reason
        assert default.json()["reason"] == reason
        assert default.json()["message"] == f"La API key no se puede usar: {spanish}."
        assert english_response.json()["reason"] == reason
        assert english_response.json()["message"] == (
            f"The API key cannot be used: {english}."
        )


def test_every_reason_has_both_languages() -> None:
    expected_reasons = {
        "invalid_phone_number": {
            "not_a_number",
            "missing_country_code",
            "invalid_country_code",
            "too_short",
            "too_long",
            "invalid_length",
            "invalid_number",
            "has_extension",
        },
        "invalid_user_api_key": {"unknown", "revoked", "expired"},
        "invalid_api_key": {
            "missing",
            "unknown",
            "expired",
            "device_inactive",
            "user_inactive",
        },
        "invalid_webhook_url": {
            "invalid_url",
            "unsupported_scheme",
            "https_required",
            "missing_host",
            "credentials_in_url",
            "unresolvable_host",
            "private_address",
        },
        "invalid_webhook_secret": {
            "blank",
            "control_character",
            "surrounding_whitespace",
            "length",
            "whsec_not_base64",
        },
        # The device protocol's codes, except the one its message spells out itself.
        "invalid_frame": {
            value
            for name, value in vars(protocol).items()
            if name.startswith("INVALID_FRAME_")
            and value != protocol.INVALID_FRAME_FIELDS
        },
    }

    assert {key: set(phrases) for key, phrases in REASONS.items()} == expected_reasons
    for key, phrases in REASONS.items():
        for reason, languages in phrases.items():
            assert set(languages) == {"es", "en"}, (key, reason)
            assert reason not in languages["es"], (key, reason)
