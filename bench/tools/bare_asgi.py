"""The bare ASGI baseline: replies to a small JSON POST with no framework, database or Redis.

It runs under the same uvicorn arguments and logging setup as `mensajero-api` (see
mensajero_api.main.main), so the difference to the API is the API's own work.
"""

import uuid
from typing import Any

import orjson
import uvicorn

from bench.toolmain import read_options
from mensajero_common.logging import configure_logging
from mensajero_common.settings import Settings


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    status = 200
    if scope["path"] != "/healthz":
        status = 201
        request = orjson.loads(body) if body else {}
        body = orjson.dumps(
            {
                "success": True,
                "data": {
                    "message_id": str(uuid.uuid4()),
                    "status": "pending",
                    "to": request.get("to"),
                    "segments": 1,
                    "encoding": "gsm7",
                },
                "message": "Mensaje aceptado",
            }
        )
    else:
        body = b'{"status":"ok"}'
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    options = read_options()
    settings = Settings(_env_file=None, LOG_JSON=True, LOG_LEVEL="INFO")
    configure_logging(settings, "bare-asgi")
    uvicorn.run(app, host="127.0.0.1", port=options["port"], log_config=None)


if __name__ == "__main__":
    main()
