"""A webhook endpoint for the benchmark: fast paths answer 200 at once, /slow never in time.

- POST /fast/<name>: 200 at once; counted per <name>.
- POST /slow: waits SLOW_DELAY_S (longer than any webhook timeout), then 200.
- GET /stats: per name, the request count and the CLOCK_MONOTONIC times of the first and
  last arrival; POST /reset clears them.
"""

import asyncio
import json
import time
from typing import Any

import uvicorn

from bench.toolmain import read_options

SLOW_DELAY_S = 60.0
TEXT = b"text/plain"
JSON = b"application/json"


class Sink:
    def __init__(self) -> None:
        self.stats: dict[str, dict[str, float]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        while (await receive()).get("more_body"):
            pass
        path: str = scope["path"]
        if path == "/stats":
            await self._reply(send, 200, json.dumps(self.stats).encode(), JSON)
            return
        if path == "/reset":
            self.stats.clear()
            await self._reply(send, 200, b"ok")
            return
        name = path.strip("/")
        now = time.monotonic()
        entry = self.stats.setdefault(name, {"count": 0, "first": now, "last": now})
        entry["count"] += 1
        entry["last"] = now
        if name == "slow":
            await asyncio.sleep(SLOW_DELAY_S)
        await self._reply(send, 200, b"ok")

    @staticmethod
    async def _reply(
        send: Any, status: int, body: bytes, content_type: bytes = TEXT
    ) -> None:
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
        ]
        await send(
            {"type": "http.response.start", "status": status, "headers": headers}
        )
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    options = read_options()
    uvicorn.run(
        Sink(),
        host="127.0.0.1",
        port=options["port"],
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
