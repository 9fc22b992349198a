"""Rendering of every error as the envelope, in the request's language.

- `AppError` (mensajero_common.errors) and its subclasses: their status, code and details.
- `RequestValidationError`: 422 `validation_error` with one `details` item per field.
- Starlette's `HTTPException` (unknown route, wrong method, body too large): 404
  `not_found`, 405 `method_not_allowed`, 413 `payload_too_large`, else `bad_request` or
  `http_error`.
- Anything else: 500 `internal_error`, logged with the exception by
  `UnhandledErrorMiddleware`, which (unlike an `Exception` handler, that Starlette runs and
  then re-raises) ends the request there.
"""

from collections.abc import Mapping
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mensajero_api.envelope import EnvelopeJSONResponse
from mensajero_common.errors import AppError
from mensajero_common.i18n import negotiate_language, translate
from mensajero_common.settings import Settings

logger = structlog.get_logger(__name__)

_HTTP_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}
_REQUEST_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})
# Scope key of the body size limit, set by RequestBodyLimitMiddleware for the 413 message.
MAX_BODY_SCOPE_KEY = "mensajero.max_body_bytes"


def request_language(request: Request) -> str:
    """Pick "es" or "en" for the request from Accept-Language and DEFAULT_LANGUAGE."""
    settings: Settings = request.app.state.settings
    return negotiate_language(
        request.headers.get("accept-language"), settings.DEFAULT_LANGUAGE
    )


def _error_response(
    status_code: int,
    body: dict[str, Any],
    language: str,
    headers: Mapping[str, str] | None = None,
) -> EnvelopeJSONResponse:
    response = EnvelopeJSONResponse(body, status_code=status_code, headers=headers)
    response.headers["Content-Language"] = language
    return response


async def handle_app_error(request: Request, error: Exception) -> EnvelopeJSONResponse:
    assert isinstance(error, AppError)
    language = request_language(request)
    return _error_response(
        error.status_code, error.to_body(language), language, error.headers
    )


def _describe_validation_item(item: Any) -> dict[str, Any]:
    location_path = [str(part) for part in item.get("loc", ())]
    location = None
    if location_path and location_path[0] in _REQUEST_LOCATIONS:
        location = location_path.pop(0)
    # The input value is left out on purpose: it may be a password.
    return {
        "field": ".".join(location_path) or location or "",
        "location": location,
        "message": item.get("msg", ""),
        "type": item.get("type", ""),
    }


async def handle_validation_error(
    request: Request, error: Exception
) -> EnvelopeJSONResponse:
    assert isinstance(error, RequestValidationError)
    language = request_language(request)
    body = {
        "success": False,
        "error": "validation_error",
        "message": translate("validation_error", language),
        "details": [_describe_validation_item(item) for item in error.errors()],
    }
    return _error_response(422, body, language)


async def handle_http_error(request: Request, error: Exception) -> EnvelopeJSONResponse:
    assert isinstance(error, StarletteHTTPException)
    language = request_language(request)
    code = _HTTP_STATUS_CODES.get(error.status_code, "http_error")
    params: dict[str, Any] = {"status": error.status_code}
    if code == "payload_too_large":
        params["limit"] = request.scope.get(MAX_BODY_SCOPE_KEY, "?")
    body = {
        "success": False,
        "error": code,
        "message": translate(code, language, **params),
    }
    return _error_response(error.status_code, body, language, error.headers)


class UnhandledErrorMiddleware:
    """Turn an exception no handler took into a logged 500 `internal_error` envelope."""

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
        except Exception:
            logger.exception(
                "request failed with an unhandled error",
                method=scope.get("method"),
                path=scope.get("path"),
            )
            # Half a response is already on the wire; only the server can end it now.
            if response_started:
                raise
            request = Request(scope)
            language = request_language(request)
            body = {
                "success": False,
                "error": "internal_error",
                "message": translate("internal_error", language),
            }
            response = _error_response(500, body, language)
            await response(scope, receive, send)


def install_error_handling(app: FastAPI) -> None:
    app.add_exception_handler(AppError, handle_app_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_middleware(UnhandledErrorMiddleware)
