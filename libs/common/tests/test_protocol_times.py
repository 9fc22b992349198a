import pytest

from mensajero_common.protocol import FrameError, SmsIncomingFrame, parse_client_frame


@pytest.mark.parametrize(
    "timestamp",
    ["0001-01-01T00:00:00+14:00", "1999-12-31T23:59:59Z", "9999-12-31T23:59:59Z"],
)
def test_incoming_rejects_impossible_timestamp(timestamp: str) -> None:
    raw = f'{{"type": "sms_incoming", "from": "+34600000000", "body": "x", "timestamp": "{timestamp}"}}'

    with pytest.raises(FrameError) as caught:
        parse_client_frame(raw)

    assert caught.value.code == "invalid_frame"
    assert caught.value.params["reason"] == "invalid_fields"
    assert caught.value.params["fields"][0]["field"] == "timestamp"


def test_incoming_reads_time_without_offset_as_utc() -> None:
    raw = '{"type": "sms_incoming", "from": "+34600000000", "body": "x", "timestamp": "2024-01-01T10:00:00"}'

    frame = parse_client_frame(raw)

    assert isinstance(frame, SmsIncomingFrame)
    assert frame.timestamp is not None
    assert frame.timestamp.isoformat() == "2024-01-01T10:00:00+00:00"
