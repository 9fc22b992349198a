"""Checks of the hub URL, and removal of the device's API key from printed text.

The agent passes the key in the URL's query (`?api_key=…`), so error messages of the
websockets library, which quote the URL, contain it.
"""

import re
from urllib.parse import urlsplit

from websockets.exceptions import InvalidStatus

REDACTED = "[redacted]"
# An `api_key` query value, up to the end of the URL or of the quoted text around it.
API_KEY_QUERY = re.compile(r"(api_key=)[^&#\s'\"<>]+")
# Shorter keys are redacted only after `api_key=`, because replacing every occurrence of
# a few characters would garble the rest of the text. Device keys are far longer.
MIN_KEY_LENGTH_TO_REPLACE = 8
# Handshake statuses of a server with no device-hub WebSocket at that path: 404 from a
# plain HTTP service, 403 from an ASGI server whose app has no such WebSocket route.
WRONG_SERVICE_STATUSES = frozenset({403, 404})


def redact_api_key(text: str, api_key: str | None = None) -> str:
    """Return `text` with every `api_key=` value, and `api_key` itself, replaced."""
    text = API_KEY_QUERY.sub(rf"\g<1>{REDACTED}", text)
    if api_key and len(api_key) >= MIN_KEY_LENGTH_TO_REPLACE:
        text = text.replace(api_key, REDACTED)
    return text


def invalid_url_reason(url: str) -> str | None:
    """Return why `url` cannot reach a device-hub, or None when it can be tried."""
    parts = urlsplit(url)
    if not parts.scheme:
        return "the URL has no scheme, but it must start with ws:// or wss://"
    if parts.scheme not in ("ws", "wss"):
        return f"the scheme is {parts.scheme!r}, but it must be ws or wss"
    if not parts.hostname:
        return "the host is missing"
    try:
        parts.port  # noqa: B018 - reading the port validates it
    except ValueError as error:
        return f"invalid port: {error}"
    return None


def handshake_failure_message(error: InvalidStatus) -> str:
    """Return the text of a rejected handshake, with a hint when the URL looks wrong."""
    status = error.response.status_code
    if status not in WRONG_SERVICE_STATUSES:
        return str(error)
    return (
        f"{error}. The URL may point at another service, such as the API, or at a "
        "wrong path. Check its port, and that its path is the device-hub's "
        "/api/v1/android/ws."
    )
