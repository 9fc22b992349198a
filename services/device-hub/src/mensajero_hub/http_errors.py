"""The device-hub's HTTP error responses, in the API's error envelope and languages.

A plain HTTP request to the WebSocket path gets 426 `websocket_upgrade_required`, an
unknown path 404 `not_found`, and a method that a path does not allow 405
`method_not_allowed`. The message is in the language of Accept-Language, else in
DEFAULT_LANGUAGE.
"""

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from mensajero_common.error_responses import app_error_response, http_error_response
from mensajero_common.errors import AppError
from mensajero_common.i18n import negotiate_language
from mensajero_hub.transport.websocket import WS_PATH


class WebSocketUpgradeRequiredError(AppError):
    """A request to the WebSocket path without the WebSocket handshake.

    RFC 9110 (section 15.5.22) requires an Upgrade header that names the protocol to
    switch to in every 426 response.
    """

    status_code = 426
    code = "websocket_upgrade_required"

    def __init__(self) -> None:
        super().__init__(headers={"Upgrade": "websocket", "Connection": "Upgrade"})


def install_error_handling(app: FastAPI, default_language: str) -> None:
    """Render the app's HTTP errors as the envelope, and add the WebSocket path's 426."""

    def request_language(request: Request) -> str:
        return negotiate_language(
            request.headers.get("accept-language"), default_language
        )

    async def handle_app_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, AppError)
        return app_error_response(error, request_language(request))

    async def handle_http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        return http_error_response(
            error.status_code, request_language(request), error.headers
        )

    # HubApp passes the WebSocket handshakes of this path to the transport and never to
    # the FastAPI app, so this route receives only plain HTTP requests.
    @app.get(WS_PATH, include_in_schema=False)
    async def websocket_path_over_http() -> None:
        raise WebSocketUpgradeRequiredError()

    app.add_exception_handler(AppError, handle_app_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
