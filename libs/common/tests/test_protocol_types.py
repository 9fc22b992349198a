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
