"""The hub URL checks and the removal of the API key from printed text."""

import pytest

from mensajero_agent.urls import REDACTED, invalid_url_reason, redact_api_key

KEY = "mdk_0123456789abcdefghijklmnopqrstuv"


@pytest.mark.parametrize(
    "text",
    [
        f"http://127.0.0.1:8000/api/v1/android/ws?api_key={KEY} isn't a valid URI",
        f"ws://hub/ws?x=1&api_key={KEY}&y=2",
        f"'ws://hub/ws?api_key={KEY}'",
        f"the key {KEY} alone",
    ],
)
def test_redact_removes_key(text: str) -> None:
    redacted = redact_api_key(text, KEY)

    assert KEY not in redacted
    assert REDACTED in redacted


def test_redact_any_api_key_value() -> None:
    redacted = redact_api_key("ws://hub/ws?api_key=other-key&x=1")

    assert redacted == f"ws://hub/ws?api_key={REDACTED}&x=1"


def test_redact_keeps_text_of_short_key() -> None:
    assert redact_api_key("a task for the phone", "k") == "a task for the phone"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8000/api/v1/android/ws", "'http'"),
        ("https://hub.example/api/v1/android/ws", "'https'"),
        ("localhost:8001/api/v1/android/ws", "'localhost'"),
        ("/api/v1/android/ws", "no scheme"),
        ("ws:///api/v1/android/ws", "host is missing"),
        ("ws://127.0.0.1:port/api/v1/android/ws", "invalid port"),
        ("ws://127.0.0.1:70000/api/v1/android/ws", "invalid port"),
    ],
)
def test_invalid_url_reason_names_problem(url: str, reason: str) -> None:
    problem = invalid_url_reason(url)

    assert problem is not None
    assert reason in problem


@pytest.mark.parametrize(
    "url", ["ws://127.0.0.1:8001/api/v1/android/ws", "wss://hub.example/ws?x=1"]
)
def test_invalid_url_reason_accepts_ws(url: str) -> None:
    assert invalid_url_reason(url) is None
