"""422 `validation_error` bodies: one localized message and a machine type per item."""

import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from api_test_helpers import ApiUser, count_rows
from fastapi import FastAPI
from httpx import AsyncClient
from security_helpers import api_routes
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.errors import describe_validation_item
from mensajero_api.query_params import SingleValueQueryRoute, single_value_query_names
from mensajero_common.models import SMSMessage
from mensajero_common.settings import Settings
from mensajero_common.validation_messages import (
    VALIDATION_MESSAGES,
    VALIDATION_REASONS,
    translate_validation_error,
)

SEND_URL = "/api/v1/sms/send"
BULK_URL = "/api/v1/sms/send-bulk"
DEVICES_URL = "/api/v1/sms/devices"
WEBHOOKS_URL = "/api/v1/sms/webhooks"
API_KEYS_URL = "/api/v1/users/me/api-keys"
MESSAGES_URL = "/api/v1/sms/messages"
INCOMING_URL = "/api/v1/sms/incoming"
SIGNUP_URL = "/api/v1/users/signup"
LOGIN_URL = "/api/v1/login/access-token"
TO = "+525512345678"
STATUSES_ES = (
    "'pending', 'assigned', 'sending', 'sent', 'delivered', 'failed', 'expired' o "
    "'received'"
)
STATUSES_EN = STATUSES_ES.replace(" o ", " or ")


@dataclass(frozen=True)
class Case:
    """One invalid request and the single details item it must produce."""

    method: str
    url: str
    request: dict[str, Any]
    field: str
    location: str
    type: str
    spanish: str
    english: str
    extra: dict[str, Any] = field(default_factory=dict)
    # Sent without the test user's token, as sign-up and login are.
    anonymous: bool = False


CASES = {
    # Presence and shape of the body.
    "missing": Case(
        "POST", SEND_URL, {"json": {"body": "Hola"}}, "to", "body", "missing",
        "Este campo es obligatorio.", "This field is required.",
    ),
    # Its own type, or it would read as a send missing its `body` field.
    "missing_body": Case(
        "POST", SEND_URL, {"headers": {"Content-Type": "application/json"}},
        "body", "body", "missing_body",
        "Falta el cuerpo de la solicitud: envía un objeto JSON.",
        "The request body is missing: send a JSON object.",
    ),
    "body_not_object": Case(
        "POST", SEND_URL, {"json": ["Hola"]}, "body", "body", "model_attributes_type",
        "Debe ser un objeto JSON.", "Must be a JSON object.",
    ),
    "extra_forbidden": Case(
        "POST", SEND_URL, {"json": {"to": TO, "body": "Hola", "tll": 60}}, "tll", "body",
        "extra_forbidden", "Este campo no está permitido aquí.",
        "This field is not allowed here.",
    ),
    "item_not_object": Case(
        "POST", BULK_URL, {"json": {"messages": ["Hola"]}}, "messages.0", "body",
        "model_attributes_type", "Debe ser un objeto JSON.", "Must be a JSON object.",
    ),
    "not_a_list": Case(
        "POST", BULK_URL, {"json": {"recipients": TO, "body": "Hola"}},
        "recipients", "body", "list_type", "Debe ser una lista.", "Must be a list.",
    ),
    # Strings.
    "string_type": Case(
        "POST", SEND_URL, {"json": {"to": 5255, "body": "Hola"}}, "to", "body",
        "string_type", "Debe ser una cadena de texto.", "Must be a string.",
    ),
    "string_too_short": Case(
        "POST", SIGNUP_URL,
        {"json": {"email": "ana@example.com", "password": "short"}},
        "password", "body", "string_too_short",
        "Debe tener al menos 8 caracteres.", "Must have at least 8 characters.",
        anonymous=True,
    ),
    "string_empty": Case(
        "POST", DEVICES_URL, {"json": {"name": "   "}}, "name", "body",
        "string_too_short", "No puede estar vacío.", "Must not be empty.",
    ),
    "string_too_long": Case(
        "POST", DEVICES_URL, {"json": {"name": "x" * 256}}, "name", "body",
        "string_too_long", "Puede tener como máximo 255 caracteres.",
        "Must have at most 255 characters.",
    ),
    "to_too_long": Case(
        "POST", SEND_URL, {"json": {"to": "+34" + "1" * 200, "body": "Hola"}}, "to",
        "body", "string_too_long", "Puede tener como máximo 64 caracteres.",
        "Must have at most 64 characters.",
    ),
    "to_trailing_spaces": Case(
        "POST", SEND_URL, {"json": {"to": "+34 612 34 56 78" + " " * 100_000, "body": "Hola"}},
        "to", "body", "string_too_long", "Puede tener como máximo 64 caracteres.",
        "Must have at most 64 characters.",
    ),
    "recipient_too_long": Case(
        "POST", BULK_URL, {"json": {"recipients": ["+34" + "1" * 200], "body": "x"}},
        "recipients.0", "body", "string_too_long",
        "Puede tener como máximo 64 caracteres.", "Must have at most 64 characters.",
    ),
    "bulk_message_to_too_long": Case(
        "POST", BULK_URL, {"json": {"messages": [{"to": "+34" + "1" * 200, "body": "x"}]}},
        "messages.0.to", "body", "string_too_long",
        "Puede tener como máximo 64 caracteres.", "Must have at most 64 characters.",
    ),
    "device_phone_too_long": Case(
        "POST", DEVICES_URL, {"json": {"name": "Pixel", "phone_number": "+34" + "1" * 200}},
        "phone_number", "body", "string_too_long",
        "Puede tener como máximo 64 caracteres.", "Must have at most 64 characters.",
    ),
    "webhook_secret_too_long": Case(
        "POST", WEBHOOKS_URL,
        {"json": {"url": "http://127.0.0.1:9/h", "secret_key": "s" * 1025}},
        "secret_key", "body", "string_too_long",
        "Puede tener como máximo 1024 caracteres.", "Must have at most 1024 characters.",
    ),
    # Lists.
    "list_empty": Case(
        "POST", WEBHOOKS_URL, {"json": {"url": "http://127.0.0.1:9/h", "events": []}},
        "events", "body", "too_short",
        "No puede estar vacía: debe tener al menos un elemento.",
        "Must not be empty: it needs at least one item.",
    ),
    "list_too_long": Case(
        "POST", WEBHOOKS_URL,
        {"json": {"url": "http://127.0.0.1:9/h", "events": ["sms_sent"] * 9}},
        "events", "body", "too_long",
        "Puede tener como máximo 8 elementos; tiene 9.",
        "Must have at most 8 items; it has 9.",
    ),
    # Booleans and numbers.
    # Query parameters are text, so their numbers and booleans are parsed.
    "bool_parsing": Case(
        "GET", WEBHOOKS_URL, {"params": {"is_active": "maybe"}},
        "is_active", "query", "bool_parsing",
        "Debe ser un booleano: true o false.", "Must be a boolean: true or false.",
    ),
    "int_parsing": Case(
        "GET", MESSAGES_URL, {"params": {"limit": "soon"}},
        "limit", "query", "int_parsing",
        "Debe ser un número entero.", "Must be an integer.",
    ),
    # Body integers and booleans are strict: `true` is not 1, nor "60" 60, nor "no"
    # false, so that a client's type mistake cannot become a silent value.
    "int_from_float": Case(
        "POST", API_KEYS_URL, {"json": {"name": "srv", "expires_in_days": 1.5}},
        "expires_in_days", "body", "int_type",
        "Debe ser un número entero.", "Must be an integer.",
    ),
    "int_from_bool": Case(
        "POST", SEND_URL, {"json": {"to": TO, "body": "Hola", "ttl": True}}, "ttl",
        "body", "int_type", "Debe ser un número entero.", "Must be an integer.",
    ),
    "int_from_string": Case(
        "POST", SEND_URL, {"json": {"to": TO, "body": "Hola", "ttl": "60"}}, "ttl",
        "body", "int_type", "Debe ser un número entero.", "Must be an integer.",
    ),
    "int_from_whole_float": Case(
        "POST", BULK_URL, {"json": {"recipients": [TO], "body": "Hola", "ttl": 60.0}},
        "ttl", "body", "int_type", "Debe ser un número entero.", "Must be an integer.",
    ),
    "bool_from_string": Case(
        "PUT", f"{DEVICES_URL}/{uuid.UUID(int=1)}", {"json": {"is_active": "no"}},
        "is_active", "body", "bool_type",
        "Debe ser un booleano: true o false.", "Must be a boolean: true or false.",
    ),
    "bool_from_int": Case(
        "POST", WEBHOOKS_URL,
        {"json": {"url": "http://127.0.0.1:9/h", "is_active": 0}},
        "is_active", "body", "bool_type",
        "Debe ser un booleano: true o false.", "Must be a boolean: true or false.",
    ),
    "int_type": Case(
        "POST", API_KEYS_URL, {"json": {"name": "srv", "expires_in_days": [1]}},
        "expires_in_days", "body", "int_type",
        "Debe ser un número entero.", "Must be an integer.",
    ),
    "greater_than": Case(
        "POST", SEND_URL, {"json": {"to": TO, "body": "Hola", "ttl": 0}}, "ttl",
        "body", "greater_than", "Debe ser mayor que 0.", "Must be greater than 0.",
    ),
    "greater_than_equal": Case(
        "POST", API_KEYS_URL, {"json": {"name": "srv", "expires_in_days": 0}},
        "expires_in_days", "body", "greater_than_equal",
        "Debe ser mayor o igual que 1.", "Must be greater than or equal to 1.",
    ),
    "less_than_equal": Case(
        "POST", API_KEYS_URL, {"json": {"name": "srv", "expires_in_days": 4000}},
        "expires_in_days", "body", "less_than_equal",
        "Debe ser menor o igual que 3650.", "Must be less than or equal to 3650.",
    ),
    # Identifiers, dates and times.
    "uuid_body": Case(
        "POST", SEND_URL, {"json": {"to": TO, "body": "Hola", "device_id": "abc"}},
        "device_id", "body", "uuid_parsing",
        "Debe ser un UUID, por ejemplo 123e4567-e89b-12d3-a456-426614174000.",
        "Must be a UUID, for example 123e4567-e89b-12d3-a456-426614174000.",
    ),
    "uuid_path": Case(
        "GET", f"{DEVICES_URL}/abc", {}, "device_id", "path", "uuid_parsing",
        "Debe ser un UUID, por ejemplo 123e4567-e89b-12d3-a456-426614174000.",
        "Must be a UUID, for example 123e4567-e89b-12d3-a456-426614174000.",
    ),
    "datetime": Case(
        "POST", SEND_URL,
        {"json": {"to": TO, "body": "Hola", "expires_at": "tomorrow"}},
        "expires_at", "body", "datetime_from_date_parsing",
        "Debe ser una fecha y hora ISO 8601, por ejemplo 2024-01-31T12:00:00Z.",
        "Must be an ISO 8601 date and time, for example 2024-01-31T12:00:00Z.",
    ),
    "date_or_datetime": Case(
        "GET", MESSAGES_URL, {"params": {"date_from": "2024-13-01"}}, "date_from",
        "query", "date_or_datetime_parsing",
        "Debe ser una fecha (2024-01-31) o una fecha y hora ISO 8601 "
        "(2024-01-31T12:00:00Z).",
        "Must be a date (2024-01-31) or an ISO 8601 date and time "
        "(2024-01-31T12:00:00Z).",
    ),
    # Query and header parameters.
    "query_int": Case(
        "GET", MESSAGES_URL, {"params": {"limit": "ten"}}, "limit", "query",
        "int_parsing", "Debe ser un número entero.", "Must be an integer.",
    ),
    "query_maximum": Case(
        "GET", f"{WEBHOOKS_URL}/00000000-0000-0000-0000-000000000000/deliveries",
        {"params": {"limit": 101}}, "limit", "query", "less_than_equal",
        "Debe ser menor o igual que 100.", "Must be less than or equal to 100.",
    ),
    "literal": Case(
        "GET", MESSAGES_URL, {"params": {"order": "up"}}, "order", "query",
        "literal_error", "Debe ser uno de estos valores: 'desc' o 'asc'.",
        "Must be one of these values: 'desc' or 'asc'.",
    ),
    "enum": Case(
        "GET", MESSAGES_URL, {"params": {"status": "lost"}}, "status.0", "query",
        "enum", f"Debe ser uno de estos valores: {STATUSES_ES}.",
        f"Must be one of these values: {STATUSES_EN}.",
    ),
    "query_extra": Case(
        "GET", MESSAGES_URL, {"params": {"stauts": "failed"}}, "stauts", "query",
        "extra_forbidden",
        "Este endpoint no tiene este parámetro de consulta. Revisa cómo está escrito "
        "o quítalo. Los parámetros admitidos están en /docs.",
        "This endpoint has no such query parameter. Check its spelling or remove it. "
        "/docs lists the parameters it accepts.",
    ),
    "incoming_listing_type": Case(
        "GET", INCOMING_URL, {"params": {"type": "outgoing"}}, "type", "query",
        "incoming_listing_type",
        "Este listado solo contiene mensajes entrantes, así que 'type' solo puede ser "
        "'incoming'. Para los salientes usa GET /api/v1/sms/messages?type=outgoing.",
        "This listing contains only incoming messages, so 'type' can only be "
        "'incoming'. For outgoing messages use GET /api/v1/sms/messages?type=outgoing.",
    ),
    "header": Case(
        "POST", SEND_URL,
        {"json": {"to": TO, "body": "Hola"}, "headers": {"Idempotency-Key": "k" * 256}},
        "Idempotency-Key", "header", "string_too_long",
        "Puede tener como máximo 255 caracteres.", "Must have at most 255 characters.",
    ),
    # The login form.
    "form_missing": Case(
        "POST", LOGIN_URL, {"data": {"password": "secret"}}, "username", "body",
        "missing", "Este campo es obligatorio.", "This field is required.",
        anonymous=True,
    ),
    "form_pattern": Case(
        "POST", LOGIN_URL,
        {"data": {"username": "ana@example.com", "password": "x", "grant_type": "pin"}},
        "grant_type", "body", "string_pattern_mismatch",
        "No tiene el formato esperado (la expresión regular ^password$).",
        "Does not have the expected form (the regular expression ^password$).",
        anonymous=True,
    ),
    # Types of our own validators.
    "nul_character": Case(
        "POST", SEND_URL, {"json": {"to": TO, "body": "a\x00b"}}, "body", "body",
        "string_contains_nul",
        "No puede contener el carácter NUL (\\u0000).",
        "Must not contain the NUL character (\\u0000).",
    ),
    "unpaired_surrogate": Case(
        "POST", SEND_URL,
        {
            "content": b'{"to": "+525512345678", "body": "a\\ud800b"}',
            "headers": {"Content-Type": "application/json"},
        },
        "body", "body", "string_unpaired_surrogate",
        "No puede contener sustitutos UTF-16 sin pareja (un escape \\ud800 a "
        "\\udfff suelto).",
        "Must not contain unpaired UTF-16 surrogates (a lone \\ud800 to \\udfff "
        "escape).",
    ),
    "bulk_forms_combined": Case(
        "POST", BULK_URL,
        {"json": {"recipients": [TO], "body": "Hola", "messages": [{"to": TO, "body": "Hola"}]}},
        "body", "body", "bulk_forms_combined",
        "Envía 'messages', o bien 'recipients' con 'body', pero no ambas formas.",
        "Send either 'messages', or 'recipients' with 'body', not both.",
    ),
    "bulk_form_missing": Case(
        "POST", BULK_URL, {"json": {"body": "Hola"}}, "body", "body",
        "bulk_form_missing",
        "Falta 'recipients' con 'body', o bien 'messages'.",
        "'recipients' with 'body', or 'messages', is required.",
    ),
    "bulk_body_missing": Case(
        "POST", BULK_URL, {"json": {"recipients": [TO]}}, "body", "body",
        "bulk_body_missing",
        "Falta 'body': es obligatorio con 'recipients'.",
        "'body' is required with 'recipients'.",
    ),
}  # fmt: skip

# address -> (reason, Spanish phrase, English phrase)
EMAIL_CASES = {
    "ana.example.com": ("missing_at_sign", "le falta la @", "it has no @"),
    "@example.com": (
        "missing_local_part",
        "no hay nada antes de la @",
        "nothing comes before the @",
    ),
    "ana@": (
        "missing_domain",
        "no hay dominio después de la @",
        "no domain comes after the @",
    ),
    "ana@example": (
        "domain_without_dot",
        "el dominio después de la @ necesita un punto, como en example.com",
        "the domain after the @ needs a dot, as in example.com",
    ),
    "ana@exa mple.com": (
        "invalid",
        "no tiene la forma de una dirección de correo",
        "it does not have the form of an email address",
    ),
}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Each test makes many requests in a row.
    return settings.model_copy(update={"RATE_LIMIT_ENABLED": False})


async def request_details(
    client: AsyncClient,
    method: str,
    url: str,
    language: str,
    headers: dict[str, str] | None = None,
    **request: Any,
) -> list[dict[str, Any]]:
    """Send a request that must fail validation; return its `details`."""
    response = await client.request(
        method, url, headers={**(headers or {}), "Accept-Language": language}, **request
    )
    assert response.status_code == 422, response.text
    assert response.headers["Content-Language"] == language
    body = response.json()
    assert body["error"] == "validation_error"
    details: list[dict[str, Any]] = body["details"]
    return details


@pytest.mark.parametrize("name", CASES)
async def test_validation_detail_localized(
    client: AsyncClient, user: ApiUser, name: str
) -> None:
    case = CASES[name]
    request = dict(case.request)
    headers = dict(request.pop("headers", {}))
    if not case.anonymous:
        headers.update(user.headers)

    for language, expected in (("es", case.spanish), ("en", case.english)):
        details = await request_details(
            client, case.method, case.url, language, headers, **request
        )

        assert len(details) == 1, details
        assert details[0] == {
            "field": case.field,
            "location": case.location,
            "message": expected,
            "type": case.type,
            **case.extra,
        }


async def test_validation_default_language_spanish(
    client: AsyncClient, user: ApiUser
) -> None:
    response = await client.post(SEND_URL, json={"body": "Hola"}, headers=user.headers)
    french = await client.post(
        SEND_URL,
        json={"body": "Hola"},
        headers={**user.headers, "Accept-Language": "fr"},
    )

    assert response.json()["details"][0]["message"] == "Este campo es obligatorio."
    assert french.json()["details"][0]["message"] == "Este campo es obligatorio."


async def test_malformed_json_names_body(client: AsyncClient, user: ApiUser) -> None:
    content = b'{"to": "+525512345678",\n "body": Hola}'
    headers = {**user.headers, "Content-Type": "application/json"}

    spanish = await request_details(
        client, "POST", SEND_URL, "es", headers, content=content
    )
    english = await request_details(
        client, "POST", SEND_URL, "en", headers, content=content
    )

    assert spanish == [
        {
            "field": "body",
            "location": "body",
            "message": "El cuerpo no es JSON válido: hay un error de sintaxis en la "
            "línea 2, columna 10.",
            "type": "json_invalid",
            "position": 33,
            "line": 2,
            "column": 10,
        }
    ]
    assert english[0]["message"] == (
        "The body is not valid JSON: there is a syntax error at line 2, column 10."
    )
    assert content.decode()[english[0]["position"] :].startswith("Hola")


INVALID_UTF8_SEND = b'{"to":"+34612345678","body":"\xff\xfe"}'


async def test_invalid_utf8_body_is_json_invalid(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    headers = {**user.headers, "Content-Type": "application/json"}

    spanish = await request_details(
        client, "POST", SEND_URL, "es", headers, content=INVALID_UTF8_SEND
    )
    english = await request_details(
        client, "POST", SEND_URL, "en", headers, content=INVALID_UTF8_SEND
    )

    assert spanish == [
        {
            "field": "body",
            "location": "body",
            "message": "El cuerpo no es JSON válido: tiene un byte que no es UTF-8 "
            "válido en la línea 1, columna 30. Envía el JSON codificado en UTF-8.",
            "type": "json_invalid",
            "reason": "invalid_utf8",
            "position": 29,
            "line": 1,
            "column": 30,
        }
    ]
    assert english[0]["message"] == (
        "The body is not valid JSON: it has a byte that is not valid UTF-8 at line 1, "
        "column 30. Send the JSON encoded in UTF-8."
    )
    assert await count_rows(session_factory, SMSMessage) == 0


async def test_invalid_utf8_rejected_by_every_json_route(
    app: FastAPI, client: AsyncClient, user: ApiUser
) -> None:
    headers = {**user.headers, "Content-Type": "application/json"}
    json_routes = [
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method, operation in operations.items()
        if "application/json" in operation.get("requestBody", {}).get("content", {})
    ]
    assert (("POST", SEND_URL)) in json_routes

    for method, path in json_routes:
        url = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)
        details = await request_details(
            client, method, url, "en", headers, content=b'{"name": "\xff"}'
        )

        assert [(item["type"], item.get("reason")) for item in details] == [
            ("json_invalid", "invalid_utf8")
        ], (method, path)


async def test_unknown_query_parameter_rejected_everywhere(
    app: FastAPI, client: AsyncClient, user: ApiUser
) -> None:
    query_routes = [
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method, operation in operations.items()
        if any(
            parameter["in"] == "query" for parameter in operation.get("parameters", [])
        )
    ]
    assert ("GET", MESSAGES_URL) in query_routes
    assert ("GET", INCOMING_URL) in query_routes
    assert ("GET", f"{WEBHOOKS_URL}/{{webhook_id}}/deliveries") in query_routes
    assert ("GET", WEBHOOKS_URL) in query_routes
    assert ("GET", DEVICES_URL) in query_routes

    for method, path in query_routes:
        url = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)
        details = await request_details(
            client, method, url, "en", user.headers, params={"foo": "bar"}
        )

        assert details == [
            {
                "field": "foo",
                "location": "query",
                "message": "This endpoint has no such query parameter. Check its "
                "spelling or remove it. /docs lists the parameters it accepts.",
                "type": "extra_forbidden",
            }
        ], (method, path)


async def test_known_query_parameters_still_accepted(
    client: AsyncClient, user: ApiUser
) -> None:
    response = await client.get(
        MESSAGES_URL,
        params=[("status", "sent"), ("status", "failed"), ("limit", "5")],
        headers=user.headers,
    )

    assert response.status_code == 200, response.text
    assert response.json()["data"]["items"] == []


async def test_deeply_nested_body_is_json_invalid(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    headers = {**user.headers, "Content-Type": "application/json"}
    prefix = '{"to": "+34612345678", "body": "Hola", "extra": '
    bodies = {
        "[" * 100_000 + "]" * 100_000: 64,
        prefix + "[" * 20_000 + "]" * 20_000 + "}": len(prefix) + 63,
        prefix + '{"a": ' * 65 + "1" + "}" * 66: len(prefix) + 6 * 63,
    }

    for content, position in bodies.items():
        spanish = await request_details(
            client, "POST", SEND_URL, "es", headers, content=content.encode()
        )
        english = await request_details(
            client, "POST", SEND_URL, "en", headers, content=content.encode()
        )

        assert spanish == [
            {
                "field": "body",
                "location": "body",
                "message": "El cuerpo JSON anida listas u objetos a más de 64 niveles, "
                "el máximo admitido. El primer nivel de más empieza en la línea 1, "
                f"columna {position + 1}.",
                "type": "json_invalid",
                "reason": "too_deep",
                "position": position,
                "line": 1,
                "column": position + 1,
            }
        ]
        assert english[0]["message"] == (
            "The JSON body nests lists or objects more than 64 levels deep, the "
            "maximum allowed. The first level too many starts at line 1, "
            f"column {position + 1}."
        )
    assert await count_rows(session_factory, SMSMessage) == 0


async def test_nesting_at_limit_is_accepted(client: AsyncClient, user: ApiUser) -> None:
    nested = "[" * 63 + "]" * 63
    brackets_in_strings = "[" * 200
    content = (
        f'{{"to": "+34612345678", "body": "{brackets_in_strings}", "extra": {nested}}}'
    )

    response = await client.post(
        SEND_URL,
        content=content.encode(),
        headers={**user.headers, "Content-Type": "application/json"},
    )

    # The body parses: the only problem is the field that no send has.
    assert response.status_code == 422, response.text
    assert [item["type"] for item in response.json()["details"]] == ["extra_forbidden"]


async def test_long_integer_body_is_json_invalid(
    client: AsyncClient, user: ApiUser
) -> None:
    prefix = '{"to": "+34612345678", "body": "Hola", "ttl": '
    content = (prefix + "1" * 5000 + "}").encode()
    headers = {**user.headers, "Content-Type": "application/json"}

    spanish = await request_details(
        client, "POST", SEND_URL, "es", headers, content=content
    )
    english = await request_details(
        client, "POST", SEND_URL, "en", headers, content=content
    )

    column = len(prefix) + 1
    assert spanish == [
        {
            "field": "body",
            "location": "body",
            "message": "El cuerpo JSON tiene un número entero de más de 4300 cifras, "
            f"el máximo admitido, en la línea 1, columna {column}.",
            "type": "json_invalid",
            "reason": "integer_too_long",
            "position": len(prefix),
            "line": 1,
            "column": column,
        }
    ]
    assert english[0]["message"] == (
        "The JSON body has an integer of more than 4300 digits, the maximum allowed, "
        f"at line 1, column {column}."
    )


async def test_email_reasons_localized(client: AsyncClient) -> None:
    for address, (reason, spanish, english) in EMAIL_CASES.items():
        payload = {"email": address, "password": "long enough password"}
        by_language = {
            language: await request_details(
                client, "POST", SIGNUP_URL, language, json=payload
            )
            for language in ("es", "en")
        }

        for language, phrase, example in (
            ("es", spanish, "Escribe una dirección como nombre@example.com."),
            ("en", english, "Write an address such as name@example.com."),
        ):
            prefix = (
                "No es un correo válido"
                if language == "es"
                else ("Not a valid email address")
            )
            assert by_language[language] == [
                {
                    "field": "email",
                    "location": "body",
                    "message": f"{prefix}: {phrase}. {example}",
                    "type": "email_invalid",
                    "reason": reason,
                }
            ], address


async def test_several_fields_each_localized(
    client: AsyncClient, user: ApiUser
) -> None:
    payload = {"to": 5, "ttl": -1, "device_id": "nope"}

    details = await request_details(
        client, "POST", SEND_URL, "es", user.headers, json=payload
    )

    assert [(item["field"], item["message"]) for item in details] == [
        ("ttl", "Debe ser mayor que 0."),
        ("to", "Debe ser una cadena de texto."),
        ("body", "Este campo es obligatorio."),
        (
            "device_id",
            "Debe ser un UUID, por ejemplo 123e4567-e89b-12d3-a456-426614174000.",
        ),
    ]


def test_unknown_type_keeps_pydantic_message() -> None:
    item = {
        "type": "some_future_type",
        "loc": ("body", "to"),
        "msg": "Input should be something else",
        "input": "x",
    }

    detail = describe_validation_item(item, "es", None)

    assert translate_validation_error("some_future_type", "es") is None
    assert detail == {
        "field": "to",
        "location": "body",
        "message": "Input should be something else",
        "type": "some_future_type",
    }


def test_missing_context_keeps_pydantic_message() -> None:
    item = {
        "type": "string_too_short",
        "loc": ("body", "name"),
        "msg": "String should have at least 3 characters",
        "input": "x",
    }

    detail = describe_validation_item(item, "es", None)

    assert detail["message"] == "String should have at least 3 characters"


def test_catalog_has_both_languages() -> None:
    formatter = string.Formatter()
    for error_type, templates in VALIDATION_MESSAGES.items():
        assert set(templates) == {"es", "en"}, error_type
        fields = {
            language: {name for _, name, _, _ in formatter.parse(text) if name}
            for language, text in templates.items()
        }
        assert fields["es"] == fields["en"], error_type
        assert templates["es"] != templates["en"], error_type
    for error_type, reasons in VALIDATION_REASONS.items():
        assert error_type in VALIDATION_MESSAGES
        for reason, phrases in reasons.items():
            assert set(phrases) == {"es", "en"}, (error_type, reason)


# The query parameters that take a single value, by route. Every other route has none.
SINGLE_VALUE_QUERY_PARAMETERS = {
    MESSAGES_URL: {
        "limit",
        "cursor",
        "order",
        "type",
        "device_id",
        "phone",
        "date_from",
        "date_to",
    },
    INCOMING_URL: {
        "limit",
        "cursor",
        "order",
        "type",
        "device_id",
        "phone",
        "date_from",
        "date_to",
    },
    DEVICES_URL: {"limit", "cursor", "order", "is_active"},
    WEBHOOKS_URL: {"limit", "cursor", "order", "is_active", "event"},
    f"{WEBHOOKS_URL}/{{webhook_id}}/deliveries": {"limit", "cursor"},
    API_KEYS_URL: {"limit", "cursor"},
}


async def test_every_route_rejects_repeated_single_values(
    app: FastAPI, client: AsyncClient, user: ApiUser
) -> None:
    found: dict[str, set[str]] = {}
    checked = 0
    for method, path, route in api_routes(app):
        assert isinstance(route, SingleValueQueryRoute), path
        names = set(single_value_query_names(route.dependant))
        if not names:
            continue
        found[path] = names
        url = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)
        for name in sorted(names):
            response = await client.request(
                method, url, params=[(name, "1"), (name, "1")], headers=user.headers
            )
            assert response.status_code == 422, (method, path, name)
            assert [
                (item["field"], item["location"], item["type"])
                for item in response.json()["details"]
            ] == [(name, "query", "query_parameter_repeated")], (method, path, name)
            checked += 1

    assert found == SINGLE_VALUE_QUERY_PARAMETERS
    assert checked == 29
