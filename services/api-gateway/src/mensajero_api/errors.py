"""Rendering of every error as the envelope, in the request's language.

- `AppError` (mensajero_common.errors) and its subclasses: their status, code and details.
- `RequestValidationError`: 422 `validation_error` with one `details` item per field, its
  `message` translated by mensajero_common.validation_messages. A body that is not
  usable JSON gets one `json_invalid` item, with a `reason` when it is not a syntax
  error (mensajero_api.jsonbody).
- Starlette's `HTTPException` (unknown route, wrong method, body too large): 404
  `not_found`, 405 `method_not_allowed`, 413 `payload_too_large`, else `bad_request` or
  `http_error`.
- Postgres or Redis unavailable (mensajero_common.transient): 503 `service_unavailable`
  with Retry-After, logged as a warning.
- Anything else: 500 `internal_error`, logged with the exception.

`UnhandledErrorMiddleware` renders the last two. Unlike an `Exception` handler, which
Starlette runs and then re-raises, it ends the request there.
"""

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mensajero_api.jsonbody import (
    JSON_BODY_REASONS,
    MAX_JSON_DEPTH,
    max_integer_digits,
)
from mensajero_common.error_responses import (
    EnvelopeJSONResponse,
    app_error_response,
    error_response,
    http_error_response,
)
from mensajero_common.errors import AppError
from mensajero_common.i18n import negotiate_language, translate
from mensajero_common.settings import Settings
from mensajero_common.transient import is_transient
from mensajero_common.validation_messages import (
    VALIDATION_REASONS,
    translate_validation_error,
)

logger = structlog.get_logger(__name__)

_REQUEST_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})
# Scope key of the body size limit, set by RequestBodyLimitMiddleware for the 413 message.
MAX_BODY_SCOPE_KEY = "mensajero.max_body_bytes"


def request_language(request: Request) -> str:
    """Pick "es" or "en" for the request from Accept-Language and DEFAULT_LANGUAGE."""
    settings: Settings = request.app.state.settings
    return negotiate_language(
        request.headers.get("accept-language"), settings.DEFAULT_LANGUAGE
    )


async def handle_app_error(request: Request, error: Exception) -> EnvelopeJSONResponse:
    assert isinstance(error, AppError)
    return app_error_response(error, request_language(request))


def _locate_json_error(document: Any, position: int) -> dict[str, int]:
    """Return the character index (from 0), line and column (from 1) of `position`."""
    if not isinstance(document, str):
        return {"position": position}
    line = document.count("\n", 0, position) + 1
    column = position - document.rfind("\n", 0, position)
    return {"position": position, "line": line, "column": column}


def describe_validation_item(item: Any, language: str, document: Any) -> dict[str, Any]:
    """Build one `details` item of a 422 body from a pydantic error dict.

    The message is in `language`, or pydantic's own for a type that has no translation.
    `document` is the body text that FastAPI failed to parse as JSON, if any, from which
    a json_invalid item gets its line and column.
    """
    error_type = item.get("type", "")
    location_path = [str(part) for part in item.get("loc", ())]
    location = None
    if location_path and location_path[0] in _REQUEST_LOCATIONS:
        location = location_path.pop(0)
    context = dict(item.get("ctx") or {})
    extra: dict[str, Any] = {}

    message_type = error_type
    if error_type == "json_invalid":
        # FastAPI puts the character position of the syntax error in `loc`, after
        # "body", where a field name would be.
        position = item["loc"][-1] if len(item.get("loc", ())) == 2 else None
        location_path = []
        if isinstance(position, int):
            extra = _locate_json_error(document, position)
            context.update(extra)
        body_reason = JSON_BODY_REASONS.get(context.get("error", ""))
        if body_reason is not None:
            message_type = f"json_invalid_{body_reason}"
            extra["reason"] = body_reason
            context.update(max_depth=MAX_JSON_DEPTH, max_digits=max_integer_digits())
    elif error_type == "missing" and location == "body" and not location_path:
        # A type of its own: as `missing` it would read as a send without its `body`
        # field, whose item also has `"field": "body"`.
        error_type = message_type = "missing_body"
    elif error_type == "extra_forbidden" and location == "query":
        message_type = "extra_forbidden_query"
    reason = context.get("reason")
    if error_type in VALIDATION_REASONS and isinstance(reason, str):
        extra["reason"] = reason

    message = translate_validation_error(message_type, language, context)
    # The input value is left out on purpose: it may be a password.
    return {
        "field": ".".join(location_path) or location or "",
        "location": location,
        "message": message if message is not None else item.get("msg", ""),
        "type": error_type,
        **extra,
    }


async def handle_validation_error(
    request: Request, error: Exception
) -> EnvelopeJSONResponse:
    assert isinstance(error, RequestValidationError)
    language = request_language(request)
    details = [
        describe_validation_item(item, language, error.body) for item in error.errors()
    ]
    body = {
        "success": False,
        "error": "validation_error",
        "message": translate("validation_error", language),
        "details": details,
    }
    return error_response(422, body, language)


async def handle_http_error(request: Request, error: Exception) -> EnvelopeJSONResponse:
    assert isinstance(error, StarletteHTTPException)
    params: dict[str, Any] = {}
    if error.status_code == 413:
        params["limit"] = request.scope.get(MAX_BODY_SCOPE_KEY, "?")
    return http_error_response(
        error.status_code, request_language(request), error.headers, **params
    )


# Seconds a client is asked to wait before it repeats a request that found Postgres or
# Redis unavailable.
UNAVAILABLE_RETRY_AFTER_S = 5


class UnhandledErrorMiddleware:
    """Turn an exception no handler took into a logged error envelope: 503
    `service_unavailable` with Retry-After when Postgres or Redis is unavailable, else
    500 `internal_error`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        response_started = False

        async def send_and_track(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_track)
        except Exception as error:
            unavailable = is_transient(error)
            if unavailable:
                # Postgres or Redis is down or out of connections: not a bug, and the
                # same request may succeed a moment later.
                logger.warning(
                    "request failed: Postgres or Redis is unavailable",
                    method=scope.get("method"),
                    path=scope.get("path"),
                    error=repr(error),
                )
            else:
                logger.exception(
                    "request failed with an unhandled error",
                    method=scope.get("method"),
                    path=scope.get("path"),
                )
            # Half a response is already on the wire; only the server can end it now.
            if response_started:
                raise
            language = request_language(Request(scope))
            code = "service_unavailable" if unavailable else "internal_error"
            body = {
                "success": False,
                "error": code,
                "message": translate(code, language),
            }
            if unavailable:
                response = error_response(
                    503,
                    body,
                    language,
                    {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
                )
            else:
                response = error_response(500, body, language)
            await response(scope, receive, send)


def install_error_handling(app: FastAPI) -> None:
    app.add_exception_handler(AppError, handle_app_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_middleware(UnhandledErrorMiddleware)
