"""Reading of JSON request bodies, with a 422 for every body that is not usable JSON.

FastAPI (0.165) turns a json.JSONDecodeError from `Request.json()` into a 422
`json_invalid` item, but any other exception into a bare 400. json.loads raises
UnicodeDecodeError for bytes that are not valid UTF-8, RecursionError for deep nesting
and ValueError for an integer longer than Python converts. So `JSONBodyRequest.json()`
reports each as a JSONBodyError, a JSONDecodeError whose message names the reason
(`JSON_BODY_REASONS`). Every router of the API uses `JSONBodyRoute` so that its
endpoints get that request, and the check of repeated query parameters of
`SingleValueQueryRoute` too.
"""

import json
import re
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response

from mensajero_api.query_params import SingleValueQueryRoute

# Request bodies of this API nest 3 levels at most. The limit leaves room for that to
# grow and stays far below the about 1,000 levels at which json.loads runs out of
# recursion (sys.getrecursionlimit() is 1,000 by default).
MAX_JSON_DEPTH = 64

INVALID_UTF8_MESSAGE = "Invalid UTF-8 byte"
TOO_DEEP_MESSAGE = f"Nested more than {MAX_JSON_DEPTH} levels deep"
INTEGER_TOO_LONG_MESSAGE = "Integer longer than the maximum number of digits"
# The `reason` of a json_invalid item, by the message of the JSONBodyError.
JSON_BODY_REASONS = {
    INVALID_UTF8_MESSAGE: "invalid_utf8",
    TOO_DEEP_MESSAGE: "too_deep",
    INTEGER_TOO_LONG_MESSAGE: "integer_too_long",
}

_STRUCTURE_OR_STRING = re.compile(r'[\[\]{}"]')
# The rest of a string after its opening quote: characters other than a quote or a
# backslash, and escapes, up to the closing quote.
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def max_integer_digits() -> int:
    """Return the most digits a JSON integer may have.

    It is Python's int_max_str_digits (4,300 by default), which int() and so json.loads
    enforce because converting a longer integer takes quadratic time.
    """
    return sys.get_int_max_str_digits()


class JSONBodyError(json.JSONDecodeError):
    """A body that is not usable JSON for a reason other than its syntax."""


def _find_excess_nesting(document: str) -> int | None:
    """Return the index of the first bracket that opens level MAX_JSON_DEPTH + 1, if any.

    Brackets inside strings are skipped. An unterminated string ends the scan, so that
    json.loads reports it as a syntax error.
    """
    if document.count("[") + document.count("{") <= MAX_JSON_DEPTH:
        return None

    depth = 0
    position = 0
    while (match := _STRUCTURE_OR_STRING.search(document, position)) is not None:
        character = match.group()
        position = match.end()
        if character == '"':
            string_end = _STRING_REST.match(document, position)
            if string_end is None:
                return None
            position = string_end.end()
        elif character in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return match.start()
        else:
            depth -= 1
    return None


def _find_long_integer(document: str) -> int | None:
    """Return the index of the first integer outside strings that has too many digits."""
    # Only called once json.loads has reached that integer, so every string before it
    # is terminated and the pattern steps over each string in one match. The lookbehind
    # skips the digits of a fraction or an exponent, which json.loads reads as a float.
    long_integer = rf"(?<![\d.eE+-])-?\d{{{max_integer_digits() + 1},}}"
    pattern = re.compile(rf'"(?:[^"\\]|\\.)*"|{long_integer}', re.DOTALL)
    for match in pattern.finditer(document):
        if not match.group().startswith('"'):
            return match.start()
    return None


def parse_json_body(body: bytes) -> Any:
    """Parse `body` as json.loads does, raising JSONDecodeError for every unusable body."""
    # json.loads(bytes) decodes the same way: UTF-8, or UTF-16 or UTF-32 when the first
    # bytes show it.
    encoding = json.detect_encoding(body)
    try:
        document = body.decode(encoding, "surrogatepass")
    except UnicodeDecodeError as error:
        readable = body.decode(encoding, "replace")
        # The bytes before the invalid one decode cleanly, so their length in
        # characters is the position of the invalid byte in `readable`.
        position = len(body[: error.start].decode(encoding, "surrogatepass"))
        raise JSONBodyError(INVALID_UTF8_MESSAGE, readable, position) from None

    excess = _find_excess_nesting(document)
    if excess is not None:
        raise JSONBodyError(TOO_DEEP_MESSAGE, document, excess)

    try:
        return json.loads(document)
    except json.JSONDecodeError:
        raise
    except ValueError:
        integer = _find_long_integer(document)
        if integer is None:
            raise
        raise JSONBodyError(INTEGER_TOO_LONG_MESSAGE, document, integer) from None


class JSONBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class JSONBodyRoute(SingleValueQueryRoute):
    """An APIRoute whose endpoint reads its JSON body with JSONBodyRequest and that
    rejects a repeated single-value query parameter (SingleValueQueryRoute)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_with_json_body(request: Request) -> Response:
            return await handle(JSONBodyRequest(request.scope, request.receive))

        return handle_with_json_body
