"""JSON encoding with orjson, in one place so that every service encodes alike."""

from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS)


def dumps_str(value: Any) -> str:
    return dumps(value).decode()


loads = orjson.loads
JSONDecodeError = orjson.JSONDecodeError
