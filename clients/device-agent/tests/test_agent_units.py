import asyncio
import random
from pathlib import Path

import pytest

from mensajero_agent import EventRecorder, MessageLedger, SimulatedBackend
from mensajero_agent.agent import (
    THROTTLED_JITTER_MAX_S,
    AgentStoppedError,
    backoff_delay_s,
    throttled_delay_s,
    url_with_key,
    url_without_key,
)
from mensajero_agent.cli import build_parser, main, stopped_hint
from mensajero_agent.pacing import DEFAULT_FRAMES_PER_S, FramePacer, frame_rate_per_s


def test_backoff_grows_then_caps() -> None:
    rng = random.Random(3)
    windows = [
        max(backoff_delay_s(attempt, 0.5, 30.0, rng) for _ in range(200))
        for attempt in range(10)
    ]

    assert windows[0] <= 0.5
    assert windows[3] <= 4.0
    assert windows[3] > 2.0
    assert all(window <= 30.0 for window in windows)
    assert windows[9] > 20.0


def test_backoff_is_jittered() -> None:
    rng = random.Random(3)
    delays = {round(backoff_delay_s(4, 0.5, 30.0, rng), 6) for _ in range(20)}

    assert len(delays) == 20


def test_throttled_delay_follows_retry_after() -> None:
    rng = random.Random(3)
    delays = [throttled_delay_s(7, 30.0, rng) for _ in range(200)]

    assert min(delays) >= 7
    assert max(delays) <= 7 + THROTTLED_JITTER_MAX_S
    assert max(delays) > 7 + THROTTLED_JITTER_MAX_S / 2


def test_throttled_delay_without_retry_after() -> None:
    assert throttled_delay_s(None, 30.0, random.Random(3)) == 30.0


def test_throttled_jitter_capped_by_backoff() -> None:
    rng = random.Random(3)
    delays = [throttled_delay_s(2, 0.5, rng) for _ in range(50)]

    assert all(2 <= delay <= 2.5 for delay in delays)


def test_url_with_key_replaces_existing_key() -> None:
    url = url_with_key("ws://hub:8001/api/v1/android/ws?api_key=old&x=1", "new key")

    assert url == "ws://hub:8001/api/v1/android/ws?x=1&api_key=new+key"
    assert url_without_key(url) == "ws://hub:8001/api/v1/android/ws?x=1"


def test_ledger_keeps_last_outcome(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = MessageLedger(path)
    ledger.record("m1", "sending")
    ledger.record("m1", "failed", "no service")
    ledger.record("m2", "sent")
    with path.open("ab") as file:
        file.write(b'{"message_id": "m3", "sta')

    reloaded = MessageLedger(path)

    assert reloaded.get("m1") is not None
    assert reloaded.get("m1").status == "failed"  # type: ignore[union-attr]
    assert reloaded.get("m1").error == "no service"  # type: ignore[union-attr]
    assert reloaded.get("m2").status == "sent"  # type: ignore[union-attr]
    assert reloaded.get("m3") is None
    assert len(reloaded) == 2


def test_ledger_creates_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "state" / "phone.jsonl"

    MessageLedger(path).record("m1", "sent")

    assert MessageLedger(path).get("m1") is not None


def test_ledger_after_line_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    MessageLedger(path).record("m1", "sent")
    # A crash while a line was written leaves it without its end of line.
    with path.open("ab") as file:
        file.write(b'{"outbox": "r1", "fra')

    MessageLedger(path).keep_frame("r2", {"type": "sms_report", "status": "delivered"})
    reloaded = MessageLedger(path)

    assert reloaded.get("m1") is not None
    assert list(reloaded.unacknowledged_frames()) == ["r2"]


def test_ledger_forgets_oldest_beyond_limit() -> None:
    ledger = MessageLedger(max_records=2)
    for message_id in ("a", "b", "c"):
        ledger.record(message_id, "sent")

    assert ledger.get("a") is None
    assert ledger.get("c") is not None
    assert len(ledger) == 2


def test_simulated_backend_rejects_bad_rate() -> None:
    with pytest.raises(ValueError, match="failure_rate"):
        SimulatedBackend(failure_rate=1.5)


async def test_simulated_backend_fails_share_of_sends() -> None:
    backend = SimulatedBackend(send_delay_ms=0, failure_rate=0.3, seed=11)
    outcomes = [await backend.send({}) for _ in range(1000)]
    failed = sum(outcome.status == "failed" for outcome in outcomes)

    assert 230 <= failed <= 370
    assert backend.sent_count == 1000 - failed


async def test_simulated_backend_without_delivery_reports() -> None:
    backend = SimulatedBackend(delivery_reports=False)

    assert await backend.wait_for_delivery({}) is None


async def test_recorder_waits_for_count() -> None:
    recorder = EventRecorder()

    async def emit_later() -> None:
        for status in ("sending", "sent"):
            await asyncio.sleep(0.01)
            recorder({"event": "report", "status": status})

    emitter = asyncio.create_task(emit_later())
    second = await recorder.wait_for("report", count=2)
    await emitter

    assert second["status"] == "sent"


async def test_recorder_timeout_lists_events() -> None:
    recorder = EventRecorder()
    recorder({"event": "connected"})

    with pytest.raises(TimeoutError, match="connected"):
        await recorder.wait_for("registered", timeout_s=0.05)


def test_parser_reads_repeated_incoming() -> None:
    args = build_parser().parse_args(
        ["--api-key", "k", "--incoming", "+34600000000:Hola", "--incoming", "Banco:a:b"]
    )

    assert args.incoming == [("+34600000000", "Hola"), ("Banco", "a:b")]


@pytest.mark.parametrize(
    ("key_error_reason", "cause", "hint"),
    [
        ("device_inactive", "the device is disabled", "Enable the device"),
        ("user_inactive", "the account is disabled", "account that owns the device"),
        ("unknown", "the server rejected the API key", "Check --api-key"),
        (None, "the server rejected the API key", "Check --api-key"),
    ],
)
def test_stopped_error_names_4001_reason(
    key_error_reason: str | None, cause: str, hint: str
) -> None:
    error = AgentStoppedError(4001, "invalid api key: …", key_error_reason)

    assert str(error).startswith(cause)
    assert hint in stopped_hint(error)
    assert error.key_still_valid is (
        key_error_reason in {"device_inactive", "user_inactive"}
    )


def test_stopped_error_revoked_key() -> None:
    error = AgentStoppedError(4003, "device api key revoked or device deleted")

    assert str(error).startswith("the device's API key was revoked")
    assert not error.key_still_valid


def test_pacer_allows_one_second_burst() -> None:
    pacer = FramePacer(4, now_s=100.0)

    for _ in range(4):
        assert pacer.delay_s(100.0) == 0.0
        pacer.take(100.0)

    assert pacer.delay_s(100.0) == pytest.approx(0.25)
    assert pacer.delay_s(100.25) == 0.0


def test_pacer_set_rate_caps_tokens() -> None:
    pacer = FramePacer(20, now_s=0.0)

    pacer.set_rate(2, now_s=0.0)
    for _ in range(2):
        pacer.take(0.0)

    assert pacer.delay_s(0.0) == pytest.approx(0.5)


def test_pacer_below_one_frame_per_second() -> None:
    pacer = FramePacer(0.5, now_s=0.0)

    pacer.take(0.0)

    assert pacer.delay_s(0.0) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("announced", "configured", "expected"),
    [
        (10, None, 10.0),
        (10, 4.0, 4.0),
        (10, 50.0, 10.0),
        (None, None, DEFAULT_FRAMES_PER_S),
        (None, 4.0, 4.0),
        (0, None, DEFAULT_FRAMES_PER_S),
        (True, None, DEFAULT_FRAMES_PER_S),
        ("10", 4.0, 4.0),
    ],
)
def test_frame_rate_choice(
    announced: object, configured: float | None, expected: float
) -> None:
    assert frame_rate_per_s(announced, configured) == expected


def test_cli_rejects_zero_frame_rate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--api-key", "mdk_any", "--max-frames-per-s", "0"])

    assert exit_info.value.code == 2
    assert "invalid --max-frames-per-s" in capsys.readouterr().err
