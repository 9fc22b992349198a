"""The device protocol: JSON frames between a phone and the device-hub.

Field names are the specification's. Additions: `request_id` on client frames (echoed in
the `ack` or `error` that answers it), `protocol_version` and `app_version` in `register`,
`sms_id` (the phone's own id of an incoming SMS, used to store it once), the segment
details, `attempt` and `expires_at` in `task`, and `attempt`, `part`, `parts` and
`retryable` in `sms_report`. docs/device-protocol.md describes every frame for phone app
authors.
"""

import json
import math
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mensajero_common import jsonutil
from mensajero_common.text import check_display_name

PROTOCOL_VERSION = 1

# WebSocket close codes sent by the hub, in the 4000-4999 range that RFC 6455 leaves to
# applications, besides the standard 1008, 1009, 1011, 1012 and 1013.
CLOSE_INVALID_API_KEY = 4001
CLOSE_REPLACED = 4002
CLOSE_REVOKED = 4003
CLOSE_HEARTBEAT_TIMEOUT = 4008
CLOSE_TOO_MANY_ERRORS = 4009
# DEVICE_FRAME_FLOOD_MAX_ERRORS frames in a row were rejected as over the frame rate.
CLOSE_RATE_LIMITED = 4029
# The client's address is past DEVICE_AUTH_FAILURES_PER_IP. The `error` frame before the
# close gives the seconds to wait in `retry_after`.
CLOSE_AUTH_THROTTLED = 4030
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_SERVICE_RESTART = 1012
# Postgres or Redis was unavailable while the session opened (RFC 6455's Try Again Later).
CLOSE_TRY_AGAIN_LATER = 1013

MAX_ID_LENGTH = 128
MAX_TEXT_LENGTH = 4096
# Parts of one multipart SMS: the concatenation header numbers them in one byte.
MAX_PARTS = 255


# Received times outside this range are a phone's clock error, not a real SMS.
EARLIEST_RECEIVED_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MAX_CLOCK_AHEAD = timedelta(days=1)


def _check_received_time(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        # A time without an offset is read as UTC, the zone the protocol uses.
        value = value.replace(tzinfo=UTC)
    if value < EARLIEST_RECEIVED_TIME:
        raise PydanticCustomError(
            "received_time_too_early",
            "must not be before {earliest}",
            {"earliest": EARLIEST_RECEIVED_TIME.date().isoformat()},
        )
    if value > datetime.now(UTC) + MAX_CLOCK_AHEAD:
        raise PydanticCustomError(
            "received_time_too_late", "must not be more than a day in the future"
        )
    return value


class _ClientFrame(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    request_id: Annotated[str | None, Field(max_length=MAX_ID_LENGTH)] = None


def _check_device_name(value: str | None) -> str | None:
    # An empty or all-space name is allowed: it keeps the stored name.
    if value is None or not value.strip():
        return value
    check_display_name(value.strip())
    return value


class RegisterFrame(_ClientFrame):
    type: Literal["register"]
    device_name: Annotated[
        str | None, Field(max_length=255), AfterValidator(_check_device_name)
    ] = None
    phone_number: Annotated[str | None, Field(max_length=64)] = None
    app_version: Annotated[str | None, Field(max_length=64)] = None
    protocol_version: Annotated[StrictInt, Field(ge=1)] = PROTOCOL_VERSION


class SmsReportFrame(_ClientFrame):
    type: Literal["sms_report"]
    message_id: uuid.UUID
    # `expired`: the phone skipped the task because its `expires_at` had passed.
    status: Literal["sending", "sent", "delivered", "failed", "expired"]
    error: Annotated[str | None, Field(max_length=1024)] = None
    # The task's `attempt`; absent, the report applies to the message's current attempt.
    attempt: Annotated[StrictInt | None, Field(ge=1)] = None
    # Set together when the phone reports one part of a multipart SMS (1-based).
    part: Annotated[StrictInt | None, Field(ge=1, le=MAX_PARTS)] = None
    parts: Annotated[StrictInt | None, Field(ge=1, le=MAX_PARTS)] = None
    # False on a `failed` report whose SMS may have gone out anyway (a send cut short by
    # a restart), so that the server ends the message instead of sending it again.
    retryable: StrictBool = True

    @model_validator(mode="after")
    def _check_part(self) -> "SmsReportFrame":
        if (self.part is None) != (self.parts is None):
            raise PydanticCustomError(
                "report_part_without_parts", "'part' and 'parts' go together"
            )
        if self.part is not None and self.parts is not None and self.part > self.parts:
            raise PydanticCustomError(
                "report_part_past_parts", "'part' must not exceed 'parts'"
            )
        return self


class SmsIncomingFrame(_ClientFrame):
    type: Literal["sms_incoming"]
    from_: Annotated[str, Field(alias="from", min_length=1, max_length=64)]
    body: Annotated[str, Field(max_length=MAX_TEXT_LENGTH)]
    timestamp: Annotated[datetime | None, AfterValidator(_check_received_time)] = None
    sms_id: Annotated[str | None, Field(min_length=1, max_length=MAX_ID_LENGTH)] = None


class PingFrame(_ClientFrame):
    type: Literal["ping"]


ClientFrame = Annotated[
    RegisterFrame | SmsReportFrame | SmsIncomingFrame | PingFrame,
    Field(discriminator="type"),
]
CLIENT_FRAME_TYPES = frozenset({"register", "sms_report", "sms_incoming", "ping"})

_client_frame_adapter: TypeAdapter[ClientFrame] = TypeAdapter(ClientFrame)


# Reasons of an `invalid_frame` error, sent as its `reason` field. Their messages are in
# mensajero_common.i18n.REASONS.
INVALID_FRAME_NOT_JSON = "not_json"
INVALID_FRAME_NOT_OBJECT = "not_object"
INVALID_FRAME_MISSING_TYPE = "missing_type"
INVALID_FRAME_NUL_CHARACTER = "nul_character"
INVALID_FRAME_NUMBER_OUT_OF_RANGE = "number_out_of_range"
INVALID_FRAME_BINARY = "binary_frame"
INVALID_FRAME_SENDER_LENGTH = "sender_length"
# A part report whose `parts` differs from the earlier part reports of its attempt.
INVALID_FRAME_PARTS_MISMATCH = "parts_mismatch"
# The frame's fields failed validation, and the error's `fields` lists each problem.
INVALID_FRAME_FIELDS = "invalid_fields"


class FrameError(ValueError):
    """A client frame that cannot be applied; `code` is the machine code sent back."""

    def __init__(
        self, code: str, *, request_id: str | None = None, **params: Any
    ) -> None:
        self.code = code
        self.request_id = request_id
        self.params = params
        super().__init__(f"{code}: {params}")


# Field problems reported for an invalid frame, at most.
MAX_FIELD_PROBLEMS = 3


def _field_problems(error: ValidationError) -> list[dict[str, Any]]:
    """Return the first problems of a frame's validation: field, pydantic type, ctx and
    pydantic's English message, which stays for a type that has no translation."""
    problems = []
    for item in error.errors()[:MAX_FIELD_PROBLEMS]:
        location = ".".join(str(part) for part in item["loc"][1:] or item["loc"])
        context = {
            name: value
            for name, value in (item.get("ctx") or {}).items()
            if isinstance(value, str | int | float)
        }
        problems.append(
            {
                "field": location,
                "type": item["type"],
                "ctx": context,
                "message": item["msg"],
            }
        )
    return problems


# Integers of client frames go into Postgres `integer` columns (4 bytes, signed).
MIN_FRAME_INTEGER = -(2**31)
MAX_FRAME_INTEGER = 2**31 - 1


def _find_unstorable_value(value: Any) -> str | None:
    """Return the reason of the first value Postgres could not store, or None.

    Postgres text cannot hold NUL (JSON can, as "\\u0000"), and a number past the
    integer columns would fail in the database instead of getting an `error` frame.
    The walk keeps its own stack instead of recursing, because orjson parses up to 1,024
    levels of nesting, deeper than Python's default recursion limit of 1,000.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return INVALID_FRAME_NUL_CHARACTER
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int | float):
            if not MIN_FRAME_INTEGER <= item <= MAX_FRAME_INTEGER:
                return INVALID_FRAME_NUMBER_OUT_OF_RANGE
        elif isinstance(item, dict):
            # Reversed, so that the first problem in the frame's order is the one found.
            pending.extend(reversed([*item.keys(), *item.values()]))
        elif isinstance(item, list):
            pending.extend(reversed(item))
    return None


# Digits of the longest integer in the frame integer range, with its sign.
_MAX_FRAME_INTEGER_DIGITS = len(str(MIN_FRAME_INTEGER))
# A \uD800 to \uDFFF escape, which can make a lone surrogate that no reply could encode.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _InfiniteNumberReader:
    """Number hooks for the standard library's JSON parser that note an infinite number.

    An integer too long for the frame range is read as infinity, so that Python never
    converts thousands of digits, and the value walk rejects it like any other.
    """

    def __init__(self) -> None:
        self.found = False

    def read_integer(self, text: str) -> int | float:
        if len(text) > _MAX_FRAME_INTEGER_DIGITS:
            self.found = True
            return math.inf
        return int(text)

    def read_float(self, text: str) -> float:
        value = float(text)
        if math.isinf(value):
            self.found = True
        return value


def _reject_json_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _read_rejected_frame(raw: str | bytes) -> Any:
    """Return a frame that orjson rejected for an infinite number only, or raise.

    orjson rejects a number that is infinite as a double, such as 1e309 or an integer
    of a few hundred digits. So that such a frame gets number_out_of_range with its
    request_id, like 2**64 or 1e308, it is read again with the standard library's parser,
    on this error path only. Any other problem stays not_json.
    """
    not_json = FrameError("invalid_frame", reason=INVALID_FRAME_NOT_JSON)
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise not_json from None
    if _SURROGATE_ESCAPE.search(text):
        raise not_json

    reader = _InfiniteNumberReader()
    try:
        data = json.loads(
            text,
            parse_int=reader.read_integer,
            parse_float=reader.read_float,
            parse_constant=_reject_json_constant,
        )
    except (ValueError, RecursionError):
        raise not_json from None
    if not reader.found:
        raise not_json
    return data


def parse_client_frame(
    raw: str | bytes,
) -> RegisterFrame | SmsReportFrame | SmsIncomingFrame | PingFrame:
    """Parse one text frame from a phone, or raise FrameError with a machine code."""
    try:
        data = jsonutil.loads(raw)
    except jsonutil.JSONDecodeError:
        data = _read_rejected_frame(raw)
    if not isinstance(data, dict):
        raise FrameError("invalid_frame", reason=INVALID_FRAME_NOT_OBJECT)
    ping = _plain_ping(data)
    if ping is not None:
        return ping

    request_id = (
        data.get("request_id") if isinstance(data.get("request_id"), str) else None
    )
    frame_type = data.get("type")
    if not isinstance(frame_type, str):
        raise FrameError(
            "invalid_frame", request_id=request_id, reason=INVALID_FRAME_MISSING_TYPE
        )
    if frame_type not in CLIENT_FRAME_TYPES:
        raise FrameError(
            "unknown_frame_type", request_id=request_id, frame_type=frame_type[:64]
        )
    problem = _find_unstorable_value(data)
    if problem is not None:
        raise FrameError("invalid_frame", request_id=request_id, reason=problem)

    try:
        return _client_frame_adapter.validate_python(data)
    except ValidationError as error:
        raise FrameError(
            "invalid_frame",
            request_id=request_id,
            reason=INVALID_FRAME_FIELDS,
            fields=_field_problems(error),
        ) from None


def _plain_ping(data: dict[str, Any]) -> PingFrame | None:
    """Return `data` as a PingFrame when it contains a valid ping and nothing else.

    Pings are most of the frames a hub reads (50,000 idle phones send 833 a second), so
    they skip the value walk and the model validation that any other frame takes. The
    result is the one those steps give. Any other ping, with an extra field or an
    invalid request_id, takes the full parse and gets its errors.
    """
    if data.get("type") != "ping" or len(data) > 2:
        return None
    request_id = data.get("request_id")
    if len(data) == 2 and (
        not isinstance(request_id, str)
        or len(request_id) > MAX_ID_LENGTH
        or "\x00" in request_id
    ):
        return None
    return PingFrame.model_construct(set(data), type="ping", request_id=request_id)


def task_frame(
    message_id: uuid.UUID,
    to: str,
    body: str,
    *,
    segments: int,
    encoding: str,
    created_at: datetime,
    attempt: int | None = None,
    expires_at: datetime | None = None,
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "task",
        "message_id": str(message_id),
        "to": to,
        "body": body,
        "segments": segments,
        "encoding": encoding,
        "created_at": created_at,
    }
    if attempt is not None:
        frame["attempt"] = attempt
    if expires_at is not None:
        frame["expires_at"] = expires_at
    return frame


def ack_frame(
    of: str, *, request_id: str | None = None, **fields: Any
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "ack", "of": of}
    if request_id is not None:
        frame["request_id"] = request_id
    frame.update({name: value for name, value in fields.items() if value is not None})
    return frame


def error_frame(
    code: str, message: str, *, request_id: str | None = None, **fields: Any
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "error": code, "message": message}
    if request_id is not None:
        frame["request_id"] = request_id
    frame.update({name: value for name, value in fields.items() if value is not None})
    return frame


def pong_frame(server_time: datetime, request_id: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "pong", "server_time": server_time}
    if request_id is not None:
        frame["request_id"] = request_id
    return frame
