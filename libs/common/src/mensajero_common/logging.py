"""Structured logging setup shared by the services."""

import logging
import re
import sys

import structlog

from mensajero_common.settings import Settings


class DeviceSecretsFilter(logging.Filter):
    """Keep device API keys and SMS bodies out of the log lines of uvicorn and websockets.

    uvicorn logs every WebSocket handshake at INFO with its path and query string
    ('"WebSocket /api/v1/android/ws?api_key=…" [accepted]'), and a device's key travels in
    the query string. That includes a phone aimed at the wrong service's port, which
    refuses the handshake with 403 or 404. At DEBUG, the websockets library logs the start of every frame
    ("< %s", "> %s"), which shows the bodies of tasks and incoming SMS; the hub's own
    "frame received" line replaces those.
    """

    # Starlette decodes the names of query parameters, so `api%5Fkey=` authenticates too.
    _api_key = re.compile(r"(api(?:_|%5f)key=)[^&\s\"']+", re.IGNORECASE)
    _frame_formats = frozenset({"< %s", "> %s"})

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str):
            return True
        if record.msg in self._frame_formats:
            return False
        message = record.getMessage()
        redacted = self._api_key.sub(r"\1[redacted]", message)
        if redacted != message:
            record.msg = redacted
            record.args = None
        return True


def configure_logging(settings: Settings, service: str) -> None:
    """Route stdlib and structlog records through one JSON (or console) renderer."""
    renderer: structlog.types.Processor
    if settings.LOG_JSON:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            # Drops a line below LOG_LEVEL before any other processor runs: the hub
            # logs DEBUG lines per frame, and building each one cost CPU for nothing.
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(DeviceSecretsFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.LOG_LEVEL.upper())
    # Library warnings (such as PyJWT's about short keys) become log records, so that they
    # come out as JSON like every other line instead of raw text on stderr.
    logging.captureWarnings(True)
    # uvicorn's access log would print query strings, and the device WebSocket carries
    # its API key in one.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs each request's full URL at INFO, and a webhook URL may carry its
    # receiver's token in the query string.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    structlog.contextvars.bind_contextvars(service=service)
