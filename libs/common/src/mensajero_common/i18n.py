"""User-facing messages in Spanish and English.

Every message has a key (usually the machine error code) and `str.format` fields. The
language comes from the request's Accept-Language header; a request that names neither
Spanish nor English gets DEFAULT_LANGUAGE.

For the messages that REASONS lists, `{reason}` becomes a localized phrase in place of
the reason's machine code. The code itself stays in the `reason` field of the error body.
"""

import contextlib
import re
from typing import Any

SUPPORTED_LANGUAGES = ("es", "en")

MESSAGES: dict[str, dict[str, str]] = {
    # Generic request errors.
    "validation_error": {
        "es": "La solicitud no es válida: revisa los campos indicados en 'details'.",
        "en": "The request is invalid: check the fields listed in 'details'.",
    },
    "not_found": {
        "es": "El recurso solicitado no existe.",
        "en": "The requested resource does not exist.",
    },
    "method_not_allowed": {
        "es": "Método HTTP no permitido en esta ruta.",
        "en": "HTTP method not allowed on this path.",
    },
    "internal_error": {
        "es": "Error interno del servidor. Inténtalo de nuevo más tarde.",
        "en": "Internal server error. Try again later.",
    },
    "service_unavailable": {
        "es": (
            "El servicio no está disponible en este momento. Repite la solicitud en "
            "unos segundos."
        ),
        "en": "The service is unavailable right now. Repeat the request in a few seconds.",
    },
    "payload_too_large": {
        "es": "El cuerpo de la solicitud supera el tamaño máximo de {limit} bytes.",
        "en": "The request body exceeds the maximum size of {limit} bytes.",
    },
    "bad_request": {
        "es": "La solicitud no es válida.",
        "en": "The request is invalid.",
    },
    "http_error": {
        "es": "La solicitud falló con el estado HTTP {status}.",
        "en": "The request failed with HTTP status {status}.",
    },
    # Authentication and users.
    "not_authenticated": {
        "es": "Falta la autenticación: envía 'Authorization: Bearer <token>' o 'X-API-Key: <API key>'.",
        "en": "Authentication is missing: send 'Authorization: Bearer <token>' or 'X-API-Key: <API key>'.",
    },
    "invalid_token": {
        "es": "El token no es válido o ha caducado. Inicia sesión de nuevo.",
        "en": "The token is invalid or has expired. Log in again.",
    },
    "user_api_key_as_token": {
        "es": "Esto es una API key de usuario, no un token de acceso: envíala en la cabecera 'X-API-Key', no en 'Authorization: Bearer'.",
        "en": "This is a user API key, not an access token: send it in the 'X-API-Key' header, not in 'Authorization: Bearer'.",
    },
    "login_form_required": {
        "es": "Envía username y password como formulario "
        "(application/x-www-form-urlencoded), no como JSON.",
        "en": "Send username and password as a form "
        "(application/x-www-form-urlencoded), not as JSON.",
    },
    "invalid_credentials": {
        "es": "Correo o contraseña incorrectos.",
        "en": "Incorrect email or password.",
    },
    "inactive_user": {
        "es": "La cuenta está desactivada. Pide al administrador de este servidor Mensajero que la active.",
        "en": "The account is disabled. Ask the administrator of this Mensajero server to enable it.",
    },
    "too_many_login_attempts": {
        "es": "Demasiados intentos fallidos de inicio de sesión. Inténtalo de nuevo en {retry_after} s.",
        "en": "Too many failed login attempts. Try again in {retry_after} s.",
    },
    "weak_password": {
        "es": "La contraseña no puede ser tu correo ni contener la parte de tu correo antes de la @.",
        "en": "The password must not be your email or contain the part of your email before the @.",
    },
    "invalid_current_password": {
        "es": "La contraseña actual no es correcta.",
        "en": "The current password is incorrect.",
    },
    "password_unchanged": {
        "es": "La contraseña nueva es igual a la actual: elige una distinta.",
        "en": "The new password is the same as the current one: choose a different one.",
    },
    "password_changed": {
        "es": "Contraseña cambiada. Los tokens anteriores ya no sirven: usa el token nuevo.",
        "en": "Password changed. Earlier tokens no longer work: use the new token.",
    },
    # User API keys.
    "invalid_user_api_key": {
        "es": "La API key no se puede usar: {reason}.",
        "en": "The API key cannot be used: {reason}.",
    },
    "device_key_not_allowed": {
        "es": "Una API key de dispositivo solo sirve para el WebSocket de dispositivos. Usa un token de acceso o una API key de usuario.",
        "en": "A device API key only works on the device WebSocket. Use an access token or a user API key.",
    },
    "credentials_mismatch": {
        "es": "El token y la API key pertenecen a cuentas distintas; envía solo uno de los dos.",
        "en": "The token and the API key belong to different accounts; send only one of them.",
    },
    "login_token_required": {
        "es": "Esta operación requiere un token de acceso obtenido con correo y contraseña, no una API key.",
        "en": "This operation requires an access token from an email and password login, not an API key.",
    },
    "api_key_not_found": {
        "es": "No existe la API key {key_id}.",
        "en": "API key {key_id} does not exist.",
    },
    "api_key_limit_reached": {
        "es": "Límite de {limit} API keys activas alcanzado: revoca alguna antes de crear otra.",
        "en": "Limit of {limit} active API keys reached: revoke one before creating another.",
    },
    "api_key_created": {
        "es": "API key creada. Guárdala ahora: no se volverá a mostrar.",
        "en": "API key created. Store it now: it will not be shown again.",
    },
    "api_key_revoked": {
        "es": "API key revocada: deja de funcionar de inmediato.",
        "en": "API key revoked: it stops working at once.",
    },
    "email_taken": {
        "es": "Ya existe una cuenta con el correo {email}.",
        "en": "An account with the email {email} already exists.",
    },
    "forbidden": {
        "es": "No tienes permiso para esta operación.",
        "en": "You do not have permission for this operation.",
    },
    "invalid_region": {
        "es": "La región {region} no es un código de país ISO 3166 con numeración telefónica propia (por ejemplo MX, ES, US).",
        "en": "The region {region} is not an ISO 3166 country code with phone numbering of its own (for example MX, ES, US).",
    },
    # Devices.
    "device_not_found": {
        "es": "No existe el dispositivo {device_id}.",
        "en": "Device {device_id} does not exist.",
    },
    "device_inactive": {
        "es": "El dispositivo {device_id} está desactivado.",
        "en": "Device {device_id} is disabled.",
    },
    # Messages.
    "message_not_found": {
        "es": "No existe el mensaje {message_id}.",
        "en": "Message {message_id} does not exist.",
    },
    "invalid_phone_number": {
        "es": "El número {number} no es válido: {reason}. Usa el formato E.164, por ejemplo +525512345678.",
        "en": "The number {number} is invalid: {reason}. Use the E.164 format, for example +525512345678.",
    },
    "phone_number_blank": {
        "es": "Falta el número de teléfono: escríbelo en formato E.164, por ejemplo +525512345678.",
        "en": "The phone number is missing: write it in the E.164 format, for example +525512345678.",
    },
    "empty_body": {
        "es": "El texto del mensaje está vacío o solo contiene espacios o caracteres invisibles.",
        "en": "The message body is empty or contains only whitespace or invisible characters.",
    },
    "body_too_long": {
        "es": "El texto tiene {length} caracteres; el máximo es {limit}.",
        "en": "The body has {length} characters; the maximum is {limit}.",
    },
    "idempotency_key_reused": {
        "es": "La clave Idempotency-Key ya se usó con otra solicitud distinta.",
        "en": "The Idempotency-Key was already used with a different request.",
    },
    "invalid_cursor": {
        "es": "El cursor de paginación no es válido; usa el valor 'next_cursor' de la respuesta anterior.",
        "en": "The pagination cursor is invalid; use the 'next_cursor' value of the previous response.",
    },
    "invalid_date_range": {
        "es": "date_from ({date_from}) es posterior a date_to ({date_to}).",
        "en": "date_from ({date_from}) is later than date_to ({date_to}).",
    },
    "message_not_cancellable": {
        "es": "El mensaje {message_id} está en estado '{status}' y ya no se puede cancelar: solo se cancela un mensaje 'pending' o 'assigned', antes de que un teléfono empiece a enviarlo.",
        "en": "Message {message_id} is '{status}' and can no longer be cancelled: only a 'pending' or 'assigned' message can be cancelled, before a phone starts sending it.",
    },
    # Quotas.
    # `.one` and `.zero` variants are picked by the count param that _COUNT_PARAMS names.
    "quota_exceeded_sms": {
        "es": "Tu plan permite {limit} SMS al mes y ya los has enviado todos. Podrás enviar más desde el {reset_date} a las 00:00 UTC. Para enviar antes, pide al administrador de este servidor Mensajero un plan mayor (los planes están en {upgrade_url}).",
        "en": "Your plan allows {limit} SMS a month and you have sent them all. You can send more from {reset_date} at 00:00 UTC. To send sooner, ask the administrator of this Mensajero server for a larger plan (plans are listed at {upgrade_url}).",
    },
    "quota_exceeded_sms.one": {
        "es": "Tu plan permite 1 SMS al mes y ya lo has enviado. Podrás enviar más desde el {reset_date} a las 00:00 UTC. Para enviar antes, pide al administrador de este servidor Mensajero un plan mayor (los planes están en {upgrade_url}).",
        "en": "Your plan allows 1 SMS a month and you have sent it. You can send more from {reset_date} at 00:00 UTC. To send sooner, ask the administrator of this Mensajero server for a larger plan (plans are listed at {upgrade_url}).",
    },
    "quota_exceeded_sms_bulk": {
        "es": "Este envío necesita {requested} SMS, pero este mes solo te quedan {available}, así que no se ha enviado ninguno. Envía como máximo {available}, o espera hasta el {reset_date} a las 00:00 UTC. Para enviar más antes, pide al administrador de este servidor Mensajero un plan mayor (los planes están en {upgrade_url}).",
        "en": "This send needs {requested} SMS, but you have only {available} left this month, so none was sent. Send at most {available}, or wait until {reset_date} at 00:00 UTC. To send more sooner, ask the administrator of this Mensajero server for a larger plan (plans are listed at {upgrade_url}).",
    },
    "quota_exceeded_sms_bulk.one": {
        "es": "Este envío necesita {requested} SMS, pero este mes solo te queda 1, así que no se ha enviado ninguno. Envía solo 1, o espera hasta el {reset_date} a las 00:00 UTC. Para enviar más antes, pide al administrador de este servidor Mensajero un plan mayor (los planes están en {upgrade_url}).",
        "en": "This send needs {requested} SMS, but you have only 1 left this month, so none was sent. Send just 1, or wait until {reset_date} at 00:00 UTC. To send more sooner, ask the administrator of this Mensajero server for a larger plan (plans are listed at {upgrade_url}).",
    },
    "quota_exceeded_sms_bulk.zero": {
        "es": "Este envío necesita {requested} SMS, pero este mes no te queda ninguno, así que no se ha enviado nada. Podrás enviar más desde el {reset_date} a las 00:00 UTC. Para enviar antes, pide al administrador de este servidor Mensajero un plan mayor (los planes están en {upgrade_url}).",
        "en": "This send needs {requested} SMS, but you have none left this month, so none was sent. You can send more from {reset_date} at 00:00 UTC. To send sooner, ask the administrator of this Mensajero server for a larger plan (plans are listed at {upgrade_url}).",
    },
    "quota_exceeded_devices": {
        "es": "Tu plan permite {limit} dispositivos y ya los tienes todos registrados. Elimina uno que ya no uses (DELETE /api/v1/sms/devices/<id>) o pide al administrador de este servidor Mensajero un plan con más dispositivos (los planes están en {upgrade_url}).",
        "en": "Your plan allows {limit} devices and all of them are registered. Delete one you no longer use (DELETE /api/v1/sms/devices/<id>) or ask the administrator of this Mensajero server for a plan with more devices (plans are listed at {upgrade_url}).",
    },
    "quota_exceeded_devices.one": {
        "es": "Tu plan permite 1 dispositivo y ya lo tienes registrado. Elimínalo si ya no lo usas (DELETE /api/v1/sms/devices/<id>) o pide al administrador de este servidor Mensajero un plan con más dispositivos (los planes están en {upgrade_url}).",
        "en": "Your plan allows 1 device and it is already registered. Delete it if you no longer use it (DELETE /api/v1/sms/devices/<id>) or ask the administrator of this Mensajero server for a plan with more devices (plans are listed at {upgrade_url}).",
    },
    "quota_exceeded_devices.zero": {
        "es": "Tu plan no permite ningún dispositivo. Pide al administrador de este servidor Mensajero un plan con dispositivos (los planes están en {upgrade_url}).",
        "en": "Your plan allows no devices. Ask the administrator of this Mensajero server for a plan with devices (plans are listed at {upgrade_url}).",
    },
    # More devices than the plan allows, after a move to a smaller plan: `to_delete` is
    # always 2 or more, because one deletion only brings the count down to the limit.
    "quota_exceeded_devices_over_limit": {
        "es": "Tu plan permite {limit} dispositivos y tienes {used} registrados, más de los que permite (por ejemplo, tras pasar a un plan menor). Para registrar otro, elimina {to_delete} que ya no uses (DELETE /api/v1/sms/devices/<id>) o pide al administrador de este servidor Mensajero un plan con más dispositivos (los planes están en {upgrade_url}).",
        "en": "Your plan allows {limit} devices and you have {used} registered, more than it allows (after a move to a smaller plan, for example). To register another, delete {to_delete} you no longer use (DELETE /api/v1/sms/devices/<id>) or ask the administrator of this Mensajero server for a plan with more devices (plans are listed at {upgrade_url}).",
    },
    "quota_exceeded_devices_over_limit.one": {
        "es": "Tu plan permite 1 dispositivo y tienes {used} registrados, más de los que permite (por ejemplo, tras pasar a un plan menor). Para registrar otro, elimina {to_delete} que ya no uses (DELETE /api/v1/sms/devices/<id>) o pide al administrador de este servidor Mensajero un plan con más dispositivos (los planes están en {upgrade_url}).",
        "en": "Your plan allows 1 device and you have {used} registered, more than it allows (after a move to a smaller plan, for example). To register another, delete {to_delete} you no longer use (DELETE /api/v1/sms/devices/<id>) or ask the administrator of this Mensajero server for a plan with more devices (plans are listed at {upgrade_url}).",
    },
    "superuser_required": {
        "es": "Solo un superusuario puede cambiar el plan de un usuario.",
        "en": "Only a superuser can change a user's plan.",
    },
    "user_not_found": {
        "es": "No existe el usuario {user_id}.",
        "en": "User {user_id} does not exist.",
    },
    "user_email_not_found": {
        "es": "No hay ningún usuario con el email {email}.",
        "en": "No user has the email {email}.",
    },
    "user_id_and_email": {
        "es": "Indica el usuario con user_id o con email, no con ambos.",
        "en": "Name the user by user_id or by email, not both.",
    },
    "plan_not_found": {
        "es": "No existe el plan {plan}. Planes disponibles: {available}.",
        "en": "Plan {plan} does not exist. Available plans: {available}.",
    },
    "plan_changed": {
        "es": "Plan cambiado a {plan}.",
        "en": "Plan changed to {plan}.",
    },
    # Bulk sending.
    "too_many_recipients": {
        "es": "La solicitud tiene {count} destinatarios; el máximo es {limit}. Divídela en varias.",
        "en": "The request has {count} recipients; the maximum is {limit}. Split it into several requests.",
    },
    "no_valid_recipients": {
        "es": "Ningún destinatario es válido; revisa la lista 'rejected'.",
        "en": "No recipient is valid; check the 'rejected' list.",
    },
    "duplicate_recipient": {
        "es": "Repite el destinatario de la posición {first_index}; se envía una sola vez.",
        "en": "Repeats the recipient at position {first_index}; it is sent only once.",
    },
    "bulk_task_not_found": {
        "es": "No existe el envío masivo {task_id}.",
        "en": "Bulk send {task_id} does not exist.",
    },
    "bulk_queued": {
        "es": "Mensajes en cola para envío: {accepted}; destinatarios rechazados: {rejected}.",
        "en": "Messages queued for sending: {accepted}; recipients rejected: {rejected}.",
    },
    "bulk_replayed": {
        "es": "Esta Idempotency-Key ya se usó: se devuelve el envío masivo creado la primera vez.",
        "en": "This Idempotency-Key was already used: returning the bulk send created the first time.",
    },
    "bulk_cancelled": {
        "es": "Mensajes cancelados: {cancelled}. Los que un teléfono ya había empezado a enviar y los ya terminados no cambian.",
        "en": "Messages cancelled: {cancelled}. Those that a phone had started sending and those already finished are unchanged.",
    },
    # Rate limits.
    "rate_limited": {
        "es": "Demasiadas solicitudes: el límite es {limit}. Inténtalo de nuevo en {retry_after} s.",
        "en": "Too many requests: the limit is {limit}. Try again in {retry_after} s.",
    },
    # Confirmations of successful API requests (the `message` of a success envelope).
    "user_created": {
        "es": "Cuenta creada.",
        "en": "Account created.",
    },
    "user_updated": {
        "es": "Perfil actualizado.",
        "en": "Profile updated.",
    },
    "device_registered": {
        "es": "Dispositivo registrado. Guarda la API key ahora: no se volverá a mostrar.",
        "en": "Device registered. Store the API key now: it is not shown again.",
    },
    "device_updated": {
        "es": "Dispositivo actualizado.",
        "en": "Device updated.",
    },
    "device_deleted": {
        "es": "Dispositivo eliminado; su API key ya no funciona.",
        "en": "Device deleted; its API key no longer works.",
    },
    "device_key_rotated": {
        "es": "Nueva API key creada; la anterior ya no funciona. Guárdala ahora: no se volverá a mostrar.",
        "en": "New API key created; the previous one no longer works. Store it now: it is not shown again.",
    },
    "message_queued": {
        "es": "Mensaje en cola para envío.",
        "en": "Message queued for sending.",
    },
    "message_replayed": {
        "es": "Esta Idempotency-Key ya se usó: se devuelve el mensaje creado la primera vez.",
        "en": "This Idempotency-Key was already used: returning the message created the first time.",
    },
    "message_cancelled": {
        "es": "Mensaje cancelado: no se enviará.",
        "en": "Message cancelled: it will not be sent.",
    },
    # Device protocol.
    "invalid_api_key": {
        "es": "La API key del dispositivo no se puede usar: {reason}.",
        "en": "The device API key cannot be used: {reason}.",
    },
    "too_many_auth_failures": {
        "es": "Demasiadas autenticaciones fallidas desde esta dirección. Inténtalo de nuevo en {retry_after} s.",
        "en": "Too many failed authentications from this address. Try again in {retry_after} s.",
    },
    "invalid_frame": {
        "es": "Trama no válida: {reason}",
        "en": "Invalid frame: {reason}",
    },
    "unknown_frame_type": {
        "es": "Tipo de trama desconocido: {frame_type}",
        "en": "Unknown frame type: {frame_type}",
    },
    "report_not_allowed": {
        "es": "El mensaje {message_id} no está asignado a este dispositivo.",
        "en": "Message {message_id} is not assigned to this device.",
    },
    "websocket_upgrade_required": {
        "es": "Esta ruta solo acepta conexiones WebSocket: conéctate con un cliente WebSocket (ws:// o wss://) y el parámetro api_key en la URL.",
        "en": "This path accepts only WebSocket connections: connect with a WebSocket client (ws:// or wss://) and the api_key query parameter.",
    },
    # Webhooks.
    "webhook_not_found": {
        "es": "No existe el webhook {webhook_id}.",
        "en": "Webhook {webhook_id} does not exist.",
    },
    "invalid_webhook_url": {
        "es": "La URL del webhook {url} no se puede usar: {reason}. Debe ser http o https, con un host y sin credenciales; en producción, https hacia una dirección pública.",
        "en": "The webhook URL {url} cannot be used: {reason}. It must be http or https, with a host and no credentials; in production, https to a public address.",
    },
    "unknown_webhook_event": {
        "es": "Eventos desconocidos: {events}. Eventos válidos: {allowed}.",
        "en": "Unknown events: {events}. Valid events: {allowed}.",
    },
    "invalid_expiry_ttl_and_expires_at": {
        "es": "Envía ttl (segundos) o expires_at (una fecha futura), no ambos.",
        "en": "Send ttl (seconds) or expires_at (a future time), not both.",
    },
    "invalid_expiry_in_the_past": {
        "es": "La fecha de expires_at ya ha pasado; envía una fecha futura.",
        "en": "expires_at has already passed; send a future time.",
    },
    "invalid_expiry_too_far": {
        "es": "expires_at está a más de {max_days} días; es el plazo más largo, como el de ttl.",
        "en": "expires_at is more than {max_days} days ahead, the longest allowed, as for ttl.",
    },
    "invalid_webhook_secret": {
        "es": "El secret_key no es válido: {reason}. Debe tener entre {min_length} y {max_length} caracteres, sin caracteres de control ni espacios o caracteres invisibles al principio o al final, y, si empieza por whsec_, seguir con base64. Omítelo para que se genere uno.",
        "en": "The secret_key is invalid: {reason}. It must have {min_length} to {max_length} characters, with no control characters and no whitespace or invisible character at the start or end, and, if it starts with whsec_, continue with base64. Leave it out to have one generated.",
    },
    "webhook_limit_reached": {
        "es": "Ya tienes {limit} webhooks, el máximo. Elimina uno antes de crear otro.",
        "en": "You already have {limit} webhooks, the maximum. Delete one before creating another.",
    },
    "webhook_created": {
        "es": "Webhook creado.",
        "en": "Webhook created.",
    },
    "webhook_created_with_secret": {
        "es": "Webhook creado. Guarda el secret_key ahora: no se volverá a mostrar.",
        "en": "Webhook created. Store the secret_key now: it is not shown again.",
    },
    "webhook_updated": {
        "es": "Webhook actualizado.",
        "en": "Webhook updated.",
    },
    "webhook_deleted": {
        "es": "Webhook eliminado.",
        "en": "Webhook deleted.",
    },
    "webhook_test_succeeded": {
        "es": "El endpoint aceptó el evento de prueba.",
        "en": "The endpoint accepted the test event.",
    },
    "webhook_test_failed": {
        "es": "El endpoint no aceptó el evento de prueba; revisa status_code y error.",
        "en": "The endpoint did not accept the test event; check status_code and error.",
    },
}

# Phrases for the `{reason}` field of a message: message key, then reason code, then
# language. Each phrase continues the message's sentence after a colon.
REASONS: dict[str, dict[str, dict[str, str]]] = {
    "invalid_phone_number": {
        "not_a_number": {
            "es": "no es un número de teléfono",
            "en": "it is not a phone number",
        },
        "missing_country_code": {
            "es": "no lleva prefijo internacional (+ y el código de país) y tu cuenta no tiene región por defecto",
            "en": "it has no international prefix (+ and the country code), and your account has no default region",
        },
        "invalid_country_code": {
            "es": "el código de país no existe",
            "en": "the country code does not exist",
        },
        "too_short": {
            "es": "tiene muy pocos dígitos",
            "en": "it has too few digits",
        },
        "too_long": {
            "es": "tiene demasiados dígitos",
            "en": "it has too many digits",
        },
        "invalid_length": {
            "es": "ningún número de ese país tiene esa cantidad de dígitos",
            "en": "no number of that country has that many digits",
        },
        "invalid_number": {
            "es": "no es un número válido en ese país",
            "en": "it is not a valid number in that country",
        },
        "has_extension": {
            "es": "lleva una extensión (ext., x o ;ext=), y un SMS no puede llegar a una extensión; escribe el número sin ella",
            "en": "it has an extension (ext., x or ;ext=), and an SMS cannot reach an extension; write the number without it",
        },
    },
    "invalid_frame": {
        "not_json": {"es": "no es JSON válido", "en": "it is not valid JSON"},
        "not_object": {
            "es": "una trama debe ser un objeto JSON",
            "en": "a frame must be a JSON object",
        },
        "missing_type": {
            "es": "falta el campo 'type'",
            "en": "the field 'type' is missing",
        },
        "nul_character": {
            "es": "un texto no puede contener el carácter NUL",
            "en": "text must not contain the NUL character",
        },
        "number_out_of_range": {
            "es": "los números deben estar entre -2147483648 y 2147483647",
            "en": "numbers must be between -2147483648 and 2147483647",
        },
        "binary_frame": {
            "es": "no se admiten tramas binarias: envía JSON en tramas de texto",
            "en": "binary frames are not supported: send JSON in text frames",
        },
        "sender_length": {
            "es": "'from' debe tener de 1 a {max_length} caracteres",
            "en": "'from' must be 1 to {max_length} characters",
        },
        "parts_mismatch": {
            "es": "'parts' debe ser {parts}, como en los informes de partes anteriores de este intento",
            "en": "'parts' must be {parts}, as in the earlier part reports of this attempt",
        },
    },
    "invalid_api_key": {
        "missing": {
            "es": "falta el parámetro api_key de la URL",
            "en": "the api_key query parameter is missing",
        },
        "unknown": {
            "es": "ningún dispositivo tiene esta key",
            "en": "no device has this key",
        },
        "expired": {
            "es": "ha caducado; rota la key del dispositivo con la API",
            "en": "it has expired; rotate the device's key with the API",
        },
        "device_inactive": {
            "es": "el dispositivo está desactivado; la misma key vuelve a funcionar cuando se active",
            "en": "the device is disabled; the same key works again once it is enabled",
        },
        "user_inactive": {
            "es": "la cuenta está desactivada; la misma key vuelve a funcionar cuando se active",
            "en": "the account is disabled; the same key works again once it is enabled",
        },
    },
    "invalid_user_api_key": {
        "unknown": {"es": "no existe", "en": "it does not exist"},
        "revoked": {"es": "fue revocada", "en": "it was revoked"},
        "expired": {"es": "ha caducado", "en": "it has expired"},
    },
    "invalid_webhook_url": {
        "invalid_url": {
            "es": "no es una URL válida",
            "en": "it is not a valid URL",
        },
        "unsupported_scheme": {
            "es": "su esquema no es http ni https",
            "en": "its scheme is neither http nor https",
        },
        "https_required": {
            "es": "en producción solo se admite https",
            "en": "production accepts only https",
        },
        "missing_host": {
            "es": "no tiene host",
            "en": "it has no host",
        },
        "credentials_in_url": {
            "es": "lleva usuario o contraseña",
            "en": "it contains a user name or password",
        },
        "unresolvable_host": {
            "es": "su host no se resuelve en DNS",
            "en": "its host does not resolve in DNS",
        },
        "private_address": {
            "es": "su host apunta a una dirección privada, de loopback o reservada",
            "en": "its host resolves to a private, loopback or reserved address",
        },
    },
    "invalid_webhook_secret": {
        "blank": {
            "es": "está vacío o solo tiene espacios o caracteres invisibles",
            "en": "it is empty or contains only whitespace or invisible characters",
        },
        "control_character": {
            "es": "contiene un carácter de control (U+0000 a U+001F, U+007F a U+009F), como un tabulador o un salto de línea",
            "en": "it contains a control character (U+0000 to U+001F, U+007F to U+009F), such as a tab or a line break",
        },
        "surrounding_whitespace": {
            "es": "empieza o termina con un espacio en blanco o un carácter invisible",
            "en": "it starts or ends with whitespace or an invisible character",
        },
        "length": {
            "es": "su longitud está fuera del rango admitido",
            "en": "its length is outside the allowed range",
        },
        "whsec_not_base64": {
            "es": "lo que sigue a whsec_ no es base64 válido",
            "en": "the part after whsec_ is not valid base64",
        },
    },
}


# A qvalue as HTTP defines it (RFC 9110): 0 to 1 with at most three decimals.
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def _quality(params: str) -> float:
    """Return the weight of one Accept-Language entry from its parameters.

    The `q` name is case-insensitive. A q value that is not a valid qvalue ("abc",
    "nan", "2", "-1") gives 0, so the entry is not acceptable.
    """
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() != "q":
            continue
        value = value.strip()
        if not _QVALUE.fullmatch(value):
            return 0.0
        return float(value)
    return 1.0


def negotiate_language(accept_language: str | None, default: str = "es") -> str:
    """Pick "es" or "en" from an Accept-Language header, by quality then by order.

    "*" matches each supported language that no other entry names. A header that
    accepts neither language gets `default`.
    """
    if not accept_language:
        return default

    # Each language's best (quality, position) among the entries that name it.
    named: dict[str, tuple[float, int]] = {}
    wildcard: tuple[float, int] | None = None
    for position, item in enumerate(accept_language.split(",")):
        tag, _, params = item.strip().partition(";")
        tag = tag.strip().lower()
        weight = (_quality(params), position)
        if tag == "*":
            wildcard = wildcard or weight
            continue
        language = tag.split("-")[0]
        if language not in SUPPORTED_LANGUAGES:
            continue
        if language not in named or weight[0] > named[language][0]:
            named[language] = weight

    if wildcard is not None:
        for language in SUPPORTED_LANGUAGES:
            named.setdefault(language, wildcard)

    best: tuple[float, int, str] | None = None
    # The default goes first, so that it wins a tie of quality and position, which
    # only "*" can produce.
    for language in sorted(named, key=lambda name: name != default):
        quality, position = named[language]
        if quality <= 0:
            continue
        # Earlier entries win ties, so the position only breaks equal qualities.
        if best is None or (quality, -position) > (best[0], -best[1]):
            best = (quality, position, language)
    return best[2] if best else default


def reason_phrase(key: str, reason: str, language: str) -> str:
    """Return the phrase of `reason` for message `key` in `language`.

    A reason that REASONS does not list is returned as it is, so a new code shows up in
    the message instead of vanishing from it.
    """
    phrases = REASONS.get(key, {}).get(reason)
    if phrases is None:
        return reason
    return phrases.get(language) or phrases["en"]


# Periods of a rate limit in the notation of `limits` ("20/minute", "100/2 hours",
# "20/s"), by name or abbreviation: (Spanish singular, Spanish plural, English singular).
_LIMIT_PERIODS = {
    "s": ("segundo", "segundos", "second"),
    "second": ("segundo", "segundos", "second"),
    "minute": ("minuto", "minutos", "minute"),
    "hour": ("hora", "horas", "hour"),
    "day": ("día", "días", "day"),
    "month": ("mes", "meses", "month"),
    "year": ("año", "años", "year"),
}
# Messages whose `limit` param is a rate limit in that notation.
_RATE_LIMIT_MESSAGES = frozenset({"rate_limited"})
# The param whose value 0 or 1 selects the `<key>.zero` or `<key>.one` message, where
# one is listed, for correct grammar.
_COUNT_PARAMS = {
    "quota_exceeded_sms": "limit",
    "quota_exceeded_sms_bulk": "available",
    "quota_exceeded_devices": "limit",
    "quota_exceeded_devices_over_limit": "limit",
}
_COUNT_VARIANTS = {0: "zero", 1: "one"}


def rate_limit_phrase(limit: str, language: str) -> str:
    """Return a rate limit such as "20/minute" or "100/2 hours" in words:
    "20 por minuto", "100 cada 2 horas". Any other text is returned as it is."""
    amount, slash, per = limit.partition("/")
    multiples, _, period = per.strip().rpartition(" ")
    period = period.lower()
    names = _LIMIT_PERIODS.get(period) or _LIMIT_PERIODS.get(period.removesuffix("s"))
    if not slash or not amount.strip().isdigit() or names is None:
        return limit
    if multiples and not multiples.isdigit():
        return limit
    count = amount.strip()
    singular, plural, english = names
    if not multiples or multiples == "1":
        return (
            f"{count} por {singular}" if language == "es" else f"{count} per {english}"
        )
    if language == "es":
        return f"{count} cada {multiples} {plural}"
    return f"{count} per {multiples} {english}s"


def _count_variant(key: str, params: dict[str, Any]) -> str:
    """Return the key of the `.zero` or `.one` variant of `key` that fits its count."""
    count = params.get(_COUNT_PARAMS.get(key, ""))
    variant = _COUNT_VARIANTS.get(count) if type(count) is int else None
    if variant is not None and f"{key}.{variant}" in MESSAGES:
        return f"{key}.{variant}"
    return key


def translate(key: str, language: str, **params: Any) -> str:
    """Return the message `key` in `language`, formatted with `params`.

    A string `reason` param of a message that REASONS lists is replaced by its phrase,
    formatted with `params` too.
    """
    templates = MESSAGES.get(_count_variant(key, params))
    if templates is None:
        return key
    reason = params.get("reason")
    if key in REASONS and isinstance(reason, str):
        phrase = reason_phrase(key, reason, language)
        # A listed phrase may name other params, such as a limit. Any other reason is
        # text from elsewhere and is never formatted.
        if reason in REASONS[key]:
            with contextlib.suppress(KeyError, IndexError, ValueError):
                phrase = phrase.format(**params)
        params["reason"] = phrase
    limit = params.get("limit")
    if key in _RATE_LIMIT_MESSAGES and isinstance(limit, str):
        params["limit"] = rate_limit_phrase(limit, language)
    template = templates.get(language) or templates["en"]
    try:
        return template.format(**params)
    except (KeyError, IndexError):
        return template
