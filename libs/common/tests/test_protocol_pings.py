"""Pings skip the full parse; each gives what the full parse gives."""

import pytest

from mensajero_common import protocol
from mensajero_common.protocol import FrameError, PingFrame, parse_client_frame

PINGS = [
    '{"type": "ping"}',
    '{"type": "ping", "request_id": "r1"}',
    '{"request_id": "r1", "type": "ping"}',
    '{"type": "ping", "request_id": ""}',
    '{"type": "ping", "request_id": "' + "r" * protocol.MAX_ID_LENGTH + '"}',
    '{"type": "ping", "request_id": "' + "r" * (protocol.MAX_ID_LENGTH + 1) + '"}',
    '{"type": "ping", "request_id": "ñ' + "r" * (protocol.MAX_ID_LENGTH - 1) + '"}',
    '{"type": "ping", "request_id": null}',
    '{"type": "ping", "request_id": 7}',
    '{"type": "ping", "request_id": "a\\u0000b"}',
    '{"type": "ping", "request_id": ["r1"]}',
    '{"type": "ping", "extra": 1}',
    '{"type": "ping", "extra": 99999999999}',
    '{"type": "ping", "extra": "a\\u0000b"}',
    '{"type": "ping", "request_id": "r1", "extra": true}',
    '{"type": "PING"}',
    '{"type": ["ping"]}',
    '{"type": "ping", "type2": "ping"}',
    "[]",
]


def _outcome(raw: str) -> tuple[str, object]:
    try:
        frame = parse_client_frame(raw)
    except FrameError as error:
        return "error", (error.code, error.request_id, error.params)
    return type(frame).__name__, (frame.model_dump(), frame.model_fields_set)


@pytest.mark.parametrize("raw", PINGS)
def test_ping_parses_as_the_full_parse_does(
    raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick = _outcome(raw)
    monkeypatch.setattr(protocol, "_plain_ping", lambda data: None)

    assert quick == _outcome(raw)


@pytest.mark.parametrize(
    ("raw", "request_id"),
    [('{"type": "ping"}', None), ('{"type": "ping", "request_id": "r1"}', "r1")],
)
def test_plain_ping_skips_the_model_validation(
    raw: str, request_id: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(data: object) -> None:
        raise AssertionError(f"validated {data!r}")

    monkeypatch.setattr(protocol._client_frame_adapter, "validate_python", fail)

    frame = parse_client_frame(raw)

    assert isinstance(frame, PingFrame)
    assert frame.request_id == request_id
