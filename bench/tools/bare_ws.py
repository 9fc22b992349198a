"""The bare WebSocket baseline: uvicorn with the device-hub's WebSocket implementation and
options, and an ASGI app that only accepts, replies and pushes.

- A text frame "probe" gets `{"t": <CLOCK_MONOTONIC ns>}` stamped just before the send,
  so the client can measure one-way push latency (both ends read the same clock).
- Any other text frame gets a small pong, as the hub answers a phone's ping.
"""

import time
from typing import Any

import uvicorn

from bench.toolmain import read_options
from mensajero_common.logging import configure_logging
from mensajero_common.settings import Settings
from mensajero_hub.main import (
    GRACEFUL_SHUTDOWN_TIMEOUT_S,
    WEBSOCKET_IMPLEMENTATION,
    websocket_options,
)

PONG = '{"type":"pong"}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http":
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
        return

    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        reply = f'{{"t":{time.monotonic_ns()}}}' if text == "probe" else PONG
        await send({"type": "websocket.send", "text": reply})


def main() -> None:
    options = read_options()
    settings = Settings(_env_file=None, LOG_JSON=True, LOG_LEVEL="INFO")
    configure_logging(settings, "bare-ws")
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=options["port"],
        ws=WEBSOCKET_IMPLEMENTATION,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_TIMEOUT_S,
        **websocket_options(settings),
    )


if __name__ == "__main__":
    main()
