"""HTTP error responses in the envelope of the API, shared by the API and the device-hub.

Every body is `{"success": false, "error": "<machine code>", "message": "<localized
text>", …details}`, and the response names its language in Content-Language.
"""

import re
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from mensajero_common import jsonutil
from mensajero_common.errors import AppError
from mensajero_common.i18n import translate

# Machine codes of the HTTP errors that Starlette raises itself (unknown route, wrong
# method, body too large). Any other status gets `http_error`.
HTTP_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(value: Any) -> Any:
    """Return `value` with each lone surrogate in its strings replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, Mapping):
        return {key: _without_surrogates(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_surrogates(item) for item in value]
    return value


class EnvelopeJSONResponse(JSONResponse):
    """A JSONResponse encoded with orjson, like the rest of the project's JSON."""

    def render(self, content: Any) -> bytes:
        try:
            return jsonutil.dumps(content)
        except TypeError:
            # orjson rejects a lone surrogate, which an error may repeat from the
            # request. The response carries U+FFFD in its place, not a 500.
            return jsonutil.dumps(_without_surrogates(content))


def error_response(
    status_code: int,
    body: dict[str, Any],
    language: str,
    headers: Mapping[str, str] | None = None,
) -> EnvelopeJSONResponse:
    """Build the response of an error `body` written in `language`."""
    response = EnvelopeJSONResponse(body, status_code=status_code, headers=headers)
    response.headers["Content-Language"] = language
    return response


def app_error_response(error: AppError, language: str) -> EnvelopeJSONResponse:
    """Build the response of an AppError: its status, code, details and headers."""
    return error_response(
        error.status_code, error.to_body(language), language, error.headers
    )


def http_error_response(
    status_code: int,
    language: str,
    headers: Mapping[str, str] | None = None,
    **params: Any,
) -> EnvelopeJSONResponse:
    """Build the response of an HTTP error status such as Starlette's 404 or 405.

    `params` fills the message's fields besides `status`, such as the `limit` of
    `payload_too_large`.
    """
    code = HTTP_ERROR_CODES.get(status_code, "http_error")
    body = {
        "success": False,
        "error": code,
        "message": translate(code, language, status=status_code, **params),
    }
    return error_response(status_code, body, language, headers)
