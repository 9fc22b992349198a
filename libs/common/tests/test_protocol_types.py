"""Numbers and booleans in phone frames: JSON's own types only, never converted."""

import pytest

from mensajero_common.protocol import (
    FrameError,
    RegisterFrame,
    SmsReportFrame,
    parse_client_frame,
)

MESSAGE_ID = "123e4567-e89b-12d3-a456-426614174000"


def _report(field: str) -> str:
    return f'{{"type": "sms_report", "message_id": "{MESSAGE_ID}", "status": "sent", {field}}}'


@pytest.mark.parametrize(
    ("raw", "field", "error_type"),
    [
        (_report('"attempt": true'), "attempt", "int_type"),
        (_report('"attempt": "2"'), "attempt", "int_type"),
        (_report('"attempt": 2.0'), "attempt", "int_type"),
        (_report('"part": 1, "parts": "2"'), "parts", "int_type"),
        (_report('"retryable": "false"'), "retryable", "bool_type"),
        (_report('"retryable": 0'), "retryable", "bool_type"),
        (
            '{"type": "register", "protocol_version": -5}',
            "protocol_version",
            "greater_than_equal",
        ),
        (
            '{"type": "register", "protocol_version": 0}',
            "protocol_version",
            "greater_than_equal",
        ),
        (
            '{"type": "register", "protocol_version": "1"}',
            "protocol_version",
            "int_type",
        ),
    ],
)
def test_wrong_type_rejected(raw: str, field: str, error_type: str) -> None:
    with pytest.raises(FrameError) as caught:
        parse_client_frame(raw)

    assert caught.value.code == "invalid_frame"
    (item,) = caught.value.params["fields"]
    assert item["field"] == field
    assert item["type"] == error_type


def test_json_numbers_and_booleans_accepted() -> None:
    report = parse_client_frame(
        _report('"attempt": 2, "part": 1, "parts": 2, "retryable": false')
    )
    register = parse_client_frame('{"type": "register", "protocol_version": 1}')

    assert isinstance(report, SmsReportFrame)
    assert report.attempt == 2
    assert report.parts == 2
    assert report.retryable is False
    assert isinstance(register, RegisterFrame)
    assert register.protocol_version == 1


def _register(value: str) -> str:
    return '{"type": "register", "request_id": "r1", "protocol_version": ' + value + "}"


@pytest.mark.parametrize(
    "value",
    ["2147483648", str(2**64), "1e308", "1e309", "-1e309", "9" * 4000, "-" + "9" * 400],
)
def test_huge_number_out_of_range(value: str) -> None:
    with pytest.raises(FrameError) as caught:
        parse_client_frame(_register(value))

    assert caught.value.code == "invalid_frame"
    assert caught.value.params == {"reason": "number_out_of_range"}
    assert caught.value.request_id == "r1"


@pytest.mark.parametrize(
    "raw",
    [
        _register("NaN"),
        _register("Infinity"),
        _register("1e309,"),
        # A lone surrogate, which orjson rejects, could not be sent back.
        '{"type": "register", "request_id": "\\ud800", "protocol_version": 1e309}',
        '{"type": "ping", "padding": ' + "[" * 1100 + "1e309" + "]" * 1100 + "}",
    ],
    ids=["nan", "infinity", "trailing_comma", "lone_surrogate", "too_deep"],
)
def test_unreadable_frame_with_huge_number_not_json(raw: str) -> None:
    with pytest.raises(FrameError) as caught:
        parse_client_frame(raw)

    assert caught.value.params == {"reason": "not_json"}
    assert caught.value.request_id is None


def test_huge_number_keeps_earlier_checks() -> None:
    with pytest.raises(FrameError) as caught:
        parse_client_frame('{"request_id": "r1", "padding": 1e309}')

    assert caught.value.params == {"reason": "missing_type"}
    assert caught.value.request_id == "r1"
