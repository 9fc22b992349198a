"""Spanish and English messages for pydantic's validation error types.

Each item of a 422 `validation_error` body gets its `message` from here, by the error's
`type`, with the error's `ctx` as `str.format` fields. A type missing from the catalog
keeps pydantic's English message: `value_error` and `assertion_error` stay out on
purpose, because their text comes from the validator that raised them. Our own
validators raise PydanticCustomError with one of the custom types at the end instead.
"""

from collections.abc import Mapping
from typing import Any

VALIDATION_MESSAGES: dict[str, dict[str, str]] = {
    # Presence and shape of the request.
    "missing": {
        "es": "Este campo es obligatorio.",
        "en": "This field is required.",
    },
    # Not a pydantic type: `missing` for the whole body, chosen by the API's handler.
    "missing_body": {
        "es": "Falta el cuerpo de la solicitud: envía un objeto JSON.",
        "en": "The request body is missing: send a JSON object.",
    },
    "extra_forbidden": {
        "es": "Este campo no está permitido aquí.",
        "en": "This field is not allowed here.",
    },
    # Not a pydantic type: `extra_forbidden` for a query parameter, chosen by the API's
    # handler.
    "extra_forbidden_query": {
        "es": "Este endpoint no tiene este parámetro de consulta. Revisa cómo está escrito o quítalo. Los parámetros admitidos están en /docs.",
        "en": "This endpoint has no such query parameter. Check its spelling or remove it. /docs lists the parameters it accepts.",
    },
    # Not a pydantic type: the API's route class reports it for a query parameter that
    # takes one value but appears more than once.
    "query_parameter_repeated": {
        "es": "Este parámetro de consulta admite un solo valor, pero la solicitud lo trae {count} veces. Envíalo una sola vez. Solo se pueden repetir los parámetros que son listas, como 'status' en los listados.",
        "en": "This query parameter takes a single value, but the request has it {count} times. Send it once. Only list parameters, such as 'status' in the listings, can be repeated.",
    },
    "json_invalid": {
        "es": "El cuerpo no es JSON válido: hay un error de sintaxis en la línea {line}, columna {column}.",
        "en": "The body is not valid JSON: there is a syntax error at line {line}, column {column}.",
    },
    # Not pydantic types: the API's handler picks one for a `json_invalid` item by its
    # `reason`, when the body is unusable for a reason other than its syntax.
    "json_invalid_invalid_utf8": {
        "es": "El cuerpo no es JSON válido: tiene un byte que no es UTF-8 válido en la línea {line}, columna {column}. Envía el JSON codificado en UTF-8.",
        "en": "The body is not valid JSON: it has a byte that is not valid UTF-8 at line {line}, column {column}. Send the JSON encoded in UTF-8.",
    },
    "json_invalid_too_deep": {
        "es": "El cuerpo JSON anida listas u objetos a más de {max_depth} niveles, el máximo admitido. El primer nivel de más empieza en la línea {line}, columna {column}.",
        "en": "The JSON body nests lists or objects more than {max_depth} levels deep, the maximum allowed. The first level too many starts at line {line}, column {column}.",
    },
    "json_invalid_integer_too_long": {
        "es": "El cuerpo JSON tiene un número entero de más de {max_digits} cifras, el máximo admitido, en la línea {line}, columna {column}.",
        "en": "The JSON body has an integer of more than {max_digits} digits, the maximum allowed, at line {line}, column {column}.",
    },
    "json_type": {
        "es": "Debe ser un texto que contenga JSON.",
        "en": "Must be a string that contains JSON.",
    },
    "model_type": {
        "es": "Debe ser un objeto JSON.",
        "en": "Must be a JSON object.",
    },
    "model_attributes_type": {
        "es": "Debe ser un objeto JSON.",
        "en": "Must be a JSON object.",
    },
    "dict_type": {
        "es": "Debe ser un objeto JSON.",
        "en": "Must be a JSON object.",
    },
    "list_type": {
        "es": "Debe ser una lista.",
        "en": "Must be a list.",
    },
    "none_required": {
        "es": "Debe ser null.",
        "en": "Must be null.",
    },
    # Strings.
    "string_type": {
        "es": "Debe ser una cadena de texto.",
        "en": "Must be a string.",
    },
    "string_too_short": {
        "es": "Debe tener al menos {min_length} caracteres.",
        "en": "Must have at least {min_length} characters.",
    },
    "string_too_short.one": {
        "es": "No puede estar vacío.",
        "en": "Must not be empty.",
    },
    "string_too_long": {
        "es": "Puede tener como máximo {max_length} caracteres.",
        "en": "Must have at most {max_length} characters.",
    },
    "string_too_long.one": {
        "es": "Puede tener como máximo 1 carácter.",
        "en": "Must have at most 1 character.",
    },
    "string_pattern_mismatch": {
        "es": "No tiene el formato esperado (la expresión regular {pattern}).",
        "en": "Does not have the expected form (the regular expression {pattern}).",
    },
    "string_unicode": {
        "es": "Debe ser texto Unicode válido.",
        "en": "Must be valid Unicode text.",
    },
    "string_not_ascii": {
        "es": "Solo puede contener caracteres ASCII.",
        "en": "Must contain only ASCII characters.",
    },
    # Lists.
    "too_short": {
        "es": "Debe tener al menos {min_length} elementos; tiene {actual_length}.",
        "en": "Must have at least {min_length} items; it has {actual_length}.",
    },
    "too_short.one": {
        "es": "No puede estar vacía: debe tener al menos un elemento.",
        "en": "Must not be empty: it needs at least one item.",
    },
    "too_long": {
        "es": "Puede tener como máximo {max_length} elementos; tiene {actual_length}.",
        "en": "Must have at most {max_length} items; it has {actual_length}.",
    },
    "too_long.one": {
        "es": "Puede tener como máximo un elemento; tiene {actual_length}.",
        "en": "Must have at most one item; it has {actual_length}.",
    },
    # Booleans and numbers.
    "bool_type": {
        "es": "Debe ser un booleano: true o false.",
        "en": "Must be a boolean: true or false.",
    },
    "bool_parsing": {
        "es": "Debe ser un booleano: true o false.",
        "en": "Must be a boolean: true or false.",
    },
    "int_type": {
        "es": "Debe ser un número entero.",
        "en": "Must be an integer.",
    },
    "int_parsing": {
        "es": "Debe ser un número entero.",
        "en": "Must be an integer.",
    },
    "int_from_float": {
        "es": "Debe ser un número entero, sin parte decimal.",
        "en": "Must be an integer, without a fractional part.",
    },
    "int_parsing_size": {
        "es": "El número entero es demasiado grande.",
        "en": "The integer is too large.",
    },
    "float_type": {
        "es": "Debe ser un número.",
        "en": "Must be a number.",
    },
    "float_parsing": {
        "es": "Debe ser un número.",
        "en": "Must be a number.",
    },
    "finite_number": {
        "es": "Debe ser un número finito.",
        "en": "Must be a finite number.",
    },
    "decimal_type": {
        "es": "Debe ser un número decimal.",
        "en": "Must be a decimal number.",
    },
    "decimal_parsing": {
        "es": "Debe ser un número decimal.",
        "en": "Must be a decimal number.",
    },
    "greater_than": {
        "es": "Debe ser mayor que {gt}.",
        "en": "Must be greater than {gt}.",
    },
    "greater_than_equal": {
        "es": "Debe ser mayor o igual que {ge}.",
        "en": "Must be greater than or equal to {ge}.",
    },
    "less_than": {
        "es": "Debe ser menor que {lt}.",
        "en": "Must be less than {lt}.",
    },
    "less_than_equal": {
        "es": "Debe ser menor o igual que {le}.",
        "en": "Must be less than or equal to {le}.",
    },
    "multiple_of": {
        "es": "Debe ser múltiplo de {multiple_of}.",
        "en": "Must be a multiple of {multiple_of}.",
    },
    # Choices.
    "literal_error": {
        "es": "Debe ser uno de estos valores: {expected}.",
        "en": "Must be one of these values: {expected}.",
    },
    "enum": {
        "es": "Debe ser uno de estos valores: {expected}.",
        "en": "Must be one of these values: {expected}.",
    },
    # Identifiers, dates and times.
    "uuid_type": {
        "es": "Debe ser un UUID, por ejemplo 123e4567-e89b-12d3-a456-426614174000.",
        "en": "Must be a UUID, for example 123e4567-e89b-12d3-a456-426614174000.",
    },
    "uuid_parsing": {
        "es": "Debe ser un UUID, por ejemplo 123e4567-e89b-12d3-a456-426614174000.",
        "en": "Must be a UUID, for example 123e4567-e89b-12d3-a456-426614174000.",
    },
    "uuid_version": {
        "es": "Debe ser un UUID de la versión {expected_version}.",
        "en": "Must be a version {expected_version} UUID.",
    },
    "datetime_type": {
        "es": "Debe ser una fecha y hora ISO 8601, por ejemplo 2024-01-31T12:00:00Z.",
        "en": "Must be an ISO 8601 date and time, for example 2024-01-31T12:00:00Z.",
    },
    "datetime_parsing": {
        "es": "Debe ser una fecha y hora ISO 8601, por ejemplo 2024-01-31T12:00:00Z.",
        "en": "Must be an ISO 8601 date and time, for example 2024-01-31T12:00:00Z.",
    },
    "datetime_from_date_parsing": {
        "es": "Debe ser una fecha y hora ISO 8601, por ejemplo 2024-01-31T12:00:00Z.",
        "en": "Must be an ISO 8601 date and time, for example 2024-01-31T12:00:00Z.",
    },
    "datetime_object_invalid": {
        "es": "La fecha y hora no existe.",
        "en": "The date and time does not exist.",
    },
    "datetime_past": {
        "es": "Debe ser una fecha y hora pasada.",
        "en": "Must be a date and time in the past.",
    },
    "datetime_future": {
        "es": "Debe ser una fecha y hora futura.",
        "en": "Must be a date and time in the future.",
    },
    "date_type": {
        "es": "Debe ser una fecha ISO 8601, por ejemplo 2024-01-31.",
        "en": "Must be an ISO 8601 date, for example 2024-01-31.",
    },
    "date_parsing": {
        "es": "Debe ser una fecha ISO 8601, por ejemplo 2024-01-31.",
        "en": "Must be an ISO 8601 date, for example 2024-01-31.",
    },
    "date_from_datetime_parsing": {
        "es": "Debe ser una fecha ISO 8601, por ejemplo 2024-01-31.",
        "en": "Must be an ISO 8601 date, for example 2024-01-31.",
    },
    "date_from_datetime_inexact": {
        "es": "Debe ser una fecha sin hora, o con la hora 00:00.",
        "en": "Must be a date without a time, or with the time 00:00.",
    },
    "date_past": {
        "es": "Debe ser una fecha pasada.",
        "en": "Must be a date in the past.",
    },
    "date_future": {
        "es": "Debe ser una fecha futura.",
        "en": "Must be a date in the future.",
    },
    "time_type": {
        "es": "Debe ser una hora ISO 8601, por ejemplo 12:30:00.",
        "en": "Must be an ISO 8601 time, for example 12:30:00.",
    },
    "time_parsing": {
        "es": "Debe ser una hora ISO 8601, por ejemplo 12:30:00.",
        "en": "Must be an ISO 8601 time, for example 12:30:00.",
    },
    "timezone_naive": {
        "es": "No puede llevar zona horaria.",
        "en": "Must not have a time zone.",
    },
    "timezone_aware": {
        "es": "Debe llevar zona horaria, por ejemplo Z o +02:00.",
        "en": "Must have a time zone, for example Z or +02:00.",
    },
    "time_delta_type": {
        "es": "Debe ser una duración: segundos o ISO 8601, por ejemplo PT1H.",
        "en": "Must be a duration: seconds or ISO 8601, for example PT1H.",
    },
    "time_delta_parsing": {
        "es": "Debe ser una duración: segundos o ISO 8601, por ejemplo PT1H.",
        "en": "Must be a duration: seconds or ISO 8601, for example PT1H.",
    },
    # URLs.
    "url_type": {
        "es": "Debe ser una URL, por ejemplo https://example.com/webhook.",
        "en": "Must be a URL, for example https://example.com/webhook.",
    },
    "url_parsing": {
        "es": "Debe ser una URL válida, por ejemplo https://example.com/webhook.",
        "en": "Must be a valid URL, for example https://example.com/webhook.",
    },
    "url_syntax_violation": {
        "es": "Debe ser una URL válida, por ejemplo https://example.com/webhook.",
        "en": "Must be a valid URL, for example https://example.com/webhook.",
    },
    "url_too_long": {
        "es": "La URL puede tener como máximo {max_length} caracteres.",
        "en": "The URL must have at most {max_length} characters.",
    },
    "url_scheme": {
        "es": "El esquema de la URL debe ser {expected_schemes}.",
        "en": "The URL scheme must be {expected_schemes}.",
    },
    # Types that the API's own validators raise with PydanticCustomError.
    "email_invalid": {
        "es": "No es un correo válido: {reason}. Escribe una dirección como nombre@example.com.",
        "en": "Not a valid email address: {reason}. Write an address such as name@example.com.",
    },
    "string_contains_nul": {
        "es": "No puede contener el carácter NUL (\\u0000).",
        "en": "Must not contain the NUL character (\\u0000).",
    },
    "string_unpaired_surrogate": {
        "es": "No puede contener sustitutos UTF-16 sin pareja (un escape \\ud800 a \\udfff suelto).",
        "en": "Must not contain unpaired UTF-16 surrogates (a lone \\ud800 to \\udfff escape).",
    },
    "string_blank": {
        "es": "Debe contener al menos un carácter visible; no bastan espacios ni caracteres invisibles como \\u200b.",
        "en": "Must contain at least one visible character; spaces and invisible characters such as \\u200b are not enough.",
    },
    "string_contains_control": {
        "es": "No puede contener caracteres de control (\\u0000 a \\u001f, \\u007f a \\u009f), separadores de línea o de párrafo (\\u2028, \\u2029) ni controles de dirección del texto (\\u061c, \\u200e, \\u200f, \\u202a a \\u202e, \\u2066 a \\u2069).",
        "en": "Must not contain control characters (\\u0000 to \\u001f, \\u007f to \\u009f), line or paragraph separators (\\u2028, \\u2029) or text direction controls (\\u061c, \\u200e, \\u200f, \\u202a to \\u202e, \\u2066 to \\u2069).",
    },
    "date_or_datetime_parsing": {
        "es": "Debe ser una fecha (2024-01-31) o una fecha y hora ISO 8601 (2024-01-31T12:00:00Z).",
        "en": "Must be a date (2024-01-31) or an ISO 8601 date and time (2024-01-31T12:00:00Z).",
    },
    "incoming_listing_type": {
        "es": "Este listado solo contiene mensajes entrantes, así que 'type' solo puede ser 'incoming'. Para los salientes usa GET /api/v1/sms/messages?type=outgoing.",
        "en": "This listing contains only incoming messages, so 'type' can only be 'incoming'. For outgoing messages use GET /api/v1/sms/messages?type=outgoing.",
    },
    "bulk_forms_combined": {
        "es": "Envía 'messages', o bien 'recipients' con 'body', pero no ambas formas.",
        "en": "Send either 'messages', or 'recipients' with 'body', not both.",
    },
    "bulk_form_missing": {
        "es": "Falta 'recipients' con 'body', o bien 'messages'.",
        "en": "'recipients' with 'body', or 'messages', is required.",
    },
    "bulk_body_missing": {
        "es": "Falta 'body': es obligatorio con 'recipients'.",
        "en": "'body' is required with 'recipients'.",
    },
    # Types that the device protocol's validators raise with PydanticCustomError.
    "received_time_too_early": {
        "es": "No puede ser anterior a {earliest}.",
        "en": "Must not be before {earliest}.",
    },
    "received_time_too_late": {
        "es": "No puede estar más de un día en el futuro.",
        "en": "Must not be more than a day in the future.",
    },
    "report_part_without_parts": {
        "es": "'part' y 'parts' van juntos.",
        "en": "'part' and 'parts' go together.",
    },
    "report_part_past_parts": {
        "es": "'part' no puede superar 'parts'.",
        "en": "'part' must not exceed 'parts'.",
    },
}

# Phrases for the `reason` in the ctx of a custom type: type, then reason, then language.
VALIDATION_REASONS: dict[str, dict[str, dict[str, str]]] = {
    "email_invalid": {
        "missing_at_sign": {"es": "le falta la @", "en": "it has no @"},
        "missing_local_part": {
            "es": "no hay nada antes de la @",
            "en": "nothing comes before the @",
        },
        "missing_domain": {
            "es": "no hay dominio después de la @",
            "en": "no domain comes after the @",
        },
        "domain_without_dot": {
            "es": "el dominio después de la @ necesita un punto, como en example.com",
            "en": "the domain after the @ needs a dot, as in example.com",
        },
        "invalid": {
            "es": "no tiene la forma de una dirección de correo",
            "en": "it does not have the form of an email address",
        },
    },
}

# The ctx field whose value 1 selects the `<type>.one` message, for correct grammar.
_COUNT_FIELDS = {
    "string_too_short": "min_length",
    "string_too_long": "max_length",
    "too_short": "min_length",
    "too_long": "max_length",
}
# ctx fields that pydantic renders as an English list of choices: "'a', 'b' or 'c'".
_CHOICE_FIELDS = ("expected", "expected_schemes")


def _localize_choices(choices: str, language: str) -> str:
    # pydantic-core 2.50 joins the last two choices with " or " and the others with ", ".
    if language != "es":
        return choices
    head, separator, last = choices.rpartition(" or ")
    return f"{head} o {last}" if separator else choices


def translate_validation_error(
    error_type: str, language: str, context: Mapping[str, Any] | None = None
) -> str | None:
    """Return the message of a pydantic error in `language`, or None if none is listed.

    `context` is the error's ctx. None also comes back when the listed template needs a
    field that the ctx lacks, so that the caller can keep pydantic's message.
    """
    params = dict(context or {})
    key = error_type
    count_field = _COUNT_FIELDS.get(error_type)
    if count_field is not None and params.get(count_field) == 1:
        key = f"{error_type}.one"
    templates = VALIDATION_MESSAGES.get(key)
    if templates is None:
        return None

    for field in _CHOICE_FIELDS:
        if isinstance(params.get(field), str):
            params[field] = _localize_choices(params[field], language)
    reason = params.get("reason")
    phrases = None
    if isinstance(reason, str):
        phrases = VALIDATION_REASONS.get(error_type, {}).get(reason)
    if phrases is not None:
        params["reason"] = phrases.get(language) or phrases["en"]

    template = templates.get(language) or templates["en"]
    try:
        return template.format(**params)
    except (KeyError, IndexError):
        return None
