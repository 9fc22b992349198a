"""Replies and close reasons the hub sends to phones, and the errors that produce them.

An `error` frame answers a frame that could not be applied; the connection stays open. A
close code ends the connection; its reason text is short English for people reading logs,
while phones act on the code (docs/device-protocol.md lists what to do on each).
"""

import uuid
from datetime import datetime
from typing import Any

from mensajero_common import protocol
from mensajero_common.i18n import REASONS, translate
from mensajero_common.validation_messages import translate_validation_error

# Close reasons, at most 123 bytes each as RFC 6455 allows.
REASON_INVALID_API_KEY = {
    "missing": "invalid api key: the api_key query parameter is missing",
    "unknown": "invalid api key: no device has this key",
    "expired": "invalid api key: the key has expired",
    "device_inactive": "invalid api key: the device is disabled",
    "user_inactive": "invalid api key: the account is disabled",
}
REASON_REPLACED = "replaced by a newer connection of this device"
REASON_REVOKED = "device api key revoked or device deleted"
REASON_TOO_MANY_ERRORS = "too many consecutive invalid frames"
REASON_RATE_LIMITED = "rate limited: too many frames per second"
REASON_SERVICE_RESTART = "service restarting, reconnect"
REASON_INTERNAL_ERROR = "internal error, reconnect later"
REASON_TRY_AGAIN_LATER = "database or redis unavailable, reconnect later"


def heartbeat_timeout_reason(timeout_s: int) -> str:
    return f"heartbeat timeout: no frame for {timeout_s} s"


def auth_throttled_reason(retry_after_s: int) -> str:
    return (
        f"too many failed authentications from this address, retry in {retry_after_s} s"
    )


class InvalidApiKeyError(Exception):
    """The key of a new connection is missing, unknown, expired or of a disabled device."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    @property
    def close_reason(self) -> str:
        return REASON_INVALID_API_KEY[self.reason]


class AuthThrottledError(Exception):
    """A connection rejected without a key check, because its address is past the limit.

    The limit is DEVICE_AUTH_FAILURES_PER_IP, and `retry_after_s` is when it lets the
    address in again.
    """

    def __init__(self, limit: str, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(f"throttled by {limit}, retry after {retry_after_s} s")

    @property
    def close_reason(self) -> str:
        return auth_throttled_reason(self.retry_after_s)


class DeviceGoneError(Exception):
    """The connection's device was deleted, so no frame of it can be stored any more.

    The API deletes the row before it publishes the revoke message that closes the
    device's connections, so frames can arrive in between.
    """


class ConnectionReplacedError(Exception):
    """A newer connection of the device has taken over, so this one must not change the
    device's record."""


class DeviceDisabledError(Exception):
    """The connection's device or its account was disabled, so no frame of it can be
    stored any more; `reason` is "device_inactive" or "user_inactive"."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class FrameRejectedError(Exception):
    """A well-formed frame that the hub refuses to apply; `code` goes to the phone."""

    def __init__(
        self,
        code: str,
        *,
        request_id: str | None = None,
        details: dict[str, Any] | None = None,
        **params: Any,
    ) -> None:
        self.code = code
        self.request_id = request_id
        self.details = details or {}
        self.params = params
        super().__init__(f"{code}: {params}")


def error_reply(
    code: str,
    language: str,
    *,
    request_id: str | None = None,
    details: dict[str, Any] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Build an `error` frame whose message is in the connection's language.

    An error whose `reason` param is a code of i18n.REASONS carries that code as its
    `reason` field. An `invalid_frame` error for invalid fields also carries `fields`:
    the field and pydantic error type of each problem.
    """
    details = dict(details or {})
    if code in REASONS and "reason" in params:
        details.setdefault("reason", params["reason"])
    if code == "invalid_frame":
        problems = params.pop("fields", None)
        if problems:
            params["reason"] = describe_field_problems(problems, language)
            details["fields"] = [
                {"field": problem["field"], "type": problem["type"]}
                for problem in problems
            ]
    message = translate(code, language, **params)
    return protocol.error_frame(code, message, request_id=request_id, **details)


def describe_field_problems(problems: list[dict[str, Any]], language: str) -> str:
    """Return a frame's field problems in `language`, as "field: message; field: message".

    A pydantic error type without a translation keeps pydantic's English message.
    """
    parts = []
    for problem in problems:
        message = translate_validation_error(problem["type"], language, problem["ctx"])
        parts.append(f"{problem['field']}: {message or problem['message']}")
    return "; ".join(parts)


def register_ack(
    *,
    device_id: uuid.UUID,
    name: str,
    phone_number: str | None,
    request_id: str | None,
    ping_interval_s: int,
    heartbeat_timeout_s: int,
    max_frame_bytes: int,
    max_frames_per_s: int,
) -> dict[str, Any]:
    """Build the `ack` of a `register`, with the timing and rate a phone has to keep."""
    frame = protocol.ack_frame(
        "register",
        request_id=request_id,
        device_id=str(device_id),
        name=name,
        protocol_version=protocol.PROTOCOL_VERSION,
        ping_interval_s=ping_interval_s,
        heartbeat_timeout_s=heartbeat_timeout_s,
        max_frame_bytes=max_frame_bytes,
        max_frames_per_s=max_frames_per_s,
    )
    # A phone without a stored number gets an explicit null rather than a missing field.
    frame["phone_number"] = phone_number
    return frame


def report_ack(
    message_id: uuid.UUID, status: str, attempt: int, request_id: str | None
) -> dict[str, Any]:
    """Build the `ack` of an `sms_report`: the message's status and current attempt."""
    return protocol.ack_frame(
        "sms_report",
        request_id=request_id,
        message_id=str(message_id),
        status=status,
        attempt=attempt,
    )


def incoming_ack(
    message_id: uuid.UUID, sms_id: str | None, request_id: str | None
) -> dict[str, Any]:
    return protocol.ack_frame(
        "sms_incoming",
        request_id=request_id,
        message_id=str(message_id),
        sms_id=sms_id,
    )


def pong(server_time: datetime, request_id: str | None) -> dict[str, Any]:
    return protocol.pong_frame(server_time, request_id)
