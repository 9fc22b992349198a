"""Entry point of `mensajero-hub`: the device WebSocket endpoint on uvicorn."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from mensajero_common.logging import configure_logging
from mensajero_common.metrics import CONNECTED_DEVICES
from mensajero_common.ops import MetricsMiddleware, metrics_response, readiness_response
from mensajero_common.settings import Settings, get_settings
from mensajero_common.startup import configure_garbage_collector
from mensajero_hub.core.auth_throttle import auth_limit_from_settings
from mensajero_hub.core.hub import Hub
from mensajero_hub.http_errors import install_error_handling
from mensajero_hub.transport import websocket

# uvicorn's WebSocket implementation: the Sans-I/O protocol of the `websockets` library,
# driven by uvicorn's asyncio.Protocol. It runs no extra task per connection, unlike the
# "websockets" implementation (the library's legacy server with keepalive and transfer
# tasks per connection), which matters for a hub holding 10,000 idle phones.
WEBSOCKET_IMPLEMENTATION = "websockets-sansio"
# Seconds uvicorn waits at shutdown for sessions to finish recording their disconnects.
GRACEFUL_SHUTDOWN_TIMEOUT_S = 25


def websocket_options(settings: Settings) -> dict[str, Any]:
    """Return uvicorn's WebSocket options for the hub (tests serve the app with them too).

    - A message larger than WEBSOCKET_MAX_FRAME_BYTES closes the connection with 1009.
    - No per-message compression: frames are small JSON, and each compressed connection
      would keep zlib state (window and buffers) for as long as it stays open.
    - No protocol-level pings from the server: phones send an application `ping` every
      WEBSOCKET_PING_INTERVAL seconds and the hub closes connections silent for
      WEBSOCKET_HEARTBEAT_TIMEOUT seconds, while server pings would wake every phone's
      radio on a schedule the phone cannot control.
    """
    return {
        "ws_max_size": settings.WEBSOCKET_MAX_FRAME_BYTES,
        "ws_per_message_deflate": False,
        "ws_ping_interval": None,
        "ws_ping_timeout": None,
    }


class HubApp:
    """The hub's ASGI application: device WebSockets go straight to the transport, and
    everything else (lifespan, /healthz, /readyz, /metrics and the HTTP errors) to the
    FastAPI app."""

    def __init__(self, api: FastAPI) -> None:
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == websocket.WS_PATH:
            await websocket.serve_device(self.api.state.hub, scope, receive, send)
            return
        await self.api(scope, receive, send)


def create_app(settings: Settings | None = None) -> HubApp:
    settings = settings or get_settings()
    # Parsed here, so that a malformed DEVICE_AUTH_FAILURES_PER_IP stops the start at once.
    auth_limit = auth_limit_from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub = Hub(settings, auth_limit)
        await hub.start()
        app.state.hub = hub
        CONNECTED_DEVICES.set_function(hub.session_count)
        try:
            yield
        finally:
            await hub.stop()

    app = FastAPI(
        title="Mensajero device-hub",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(MetricsMiddleware, service="device-hub")
    install_error_handling(app, settings.DEFAULT_LANGUAGE)

    # HEAD too, since uptime monitors often probe with it.
    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz() -> JSONResponse:
        return await readiness_response(app.state.hub.readiness_checks())

    @app.get("/metrics")
    async def metrics() -> Response:
        return metrics_response()

    return HubApp(app)


def main() -> None:
    settings = get_settings()
    configure_logging(settings, "device-hub")
    app = create_app(settings)
    configure_garbage_collector()
    uvicorn.run(
        app,
        host=settings.HUB_HOST,
        port=settings.HUB_PORT,
        forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS,
        ws=WEBSOCKET_IMPLEMENTATION,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_TIMEOUT_S,
        **websocket_options(settings),
    )


if __name__ == "__main__":
    main()
