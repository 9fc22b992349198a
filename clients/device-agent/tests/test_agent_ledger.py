"""The agent's state file under crashes, long runs and files of earlier versions.

The crash tests kill real processes with SIGKILL. An audit hook (sys.addaudithook) in
the child picks the moment. It is called for every open and rename that the ledger
makes, so it can kill the child between two steps without knowing how the ledger writes.
"""

import asyncio
import contextlib
import inspect
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from agent_helpers import (
    Sessions,
    create_device,
    load_message,
    queue_message,
    running_agent,
    serve_hub_on,
)
from redis.asyncio import Redis

from mensajero_agent import MessageLedger, SimulatedBackend
from mensajero_agent.ledger import COMPACTION_MIN_LINES
from mensajero_common.keys import RedisKeys
from mensajero_common.models import MessageStatus
from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, scaled

# The start of a child process's script. The child defines `kill_when(event, args)`,
# which decides when it kills itself with SIGKILL, and then calls
# sys.addaudithook(hook).
KILL_HOOK = textwrap.dedent(
    """
    import os
    import signal
    import sys


    def is_write(mode, flags):
        if isinstance(mode, str):
            return any(letter in mode for letter in "wax+")
        return bool(flags & (os.O_WRONLY | os.O_RDWR))


    def opened_path(args):
        if not isinstance(args[0], (str, bytes, os.PathLike)):
            return None
        return os.path.abspath(os.fsdecode(args[0]))


    checking = False


    def hook(event, args):
        global checking
        if checking:
            return
        checking = True
        try:
            if kill_when(event, args):
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            checking = False
    """
)


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def report_frame(message_id: str, status: str) -> dict[str, Any]:
    return {"type": "sms_report", "message_id": message_id, "status": status}


def ledger_state(ledger: MessageLedger, message_ids: list[str]) -> dict[str, Any]:
    return {
        "records": {message_id: ledger.get(message_id) for message_id in message_ids},
        "frames": list(ledger.unacknowledged_frames().items()),
    }


# One logical change, one line.


def test_ledger_atomic_block_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "state.jsonl"
    ledger = MessageLedger(path)

    with ledger.atomic():
        ledger.record("m1", "sent", attempt=2)
        ledger.keep_frame("r1", report_frame("m1", "sent"))
        ledger.keep_frame("r2", report_frame("m1", "sent") | {"part": 2})
    reloaded = MessageLedger(path)

    assert line_count(path) == 1
    assert reloaded.get("m1") is not None
    assert reloaded.get("m1").attempt == 2  # type: ignore[union-attr]
    assert list(reloaded.unacknowledged_frames()) == ["r1", "r2"]


def test_ledger_continues_old_two_line_file(tmp_path: Path) -> None:
    path = tmp_path / "state.jsonl"
    # As agents before atomic() wrote them: an outcome and its frame on two lines.
    old_lines = [
        {"message_id": "m1", "status": "sending", "error": None, "attempt": 1},
        {"message_id": "m1", "status": "sent", "error": None, "attempt": 1},
        {"outbox": "r1", "frame": report_frame("m1", "sent")},
        {"acknowledged": "r1"},
        {"message_id": "m1", "status": "delivered", "error": None, "attempt": 1},
        {"outbox": "r2", "frame": report_frame("m1", "delivered")},
        {"message_id": "m2", "status": "failed", "error": "x", "retryable": False},
    ]
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in old_lines))

    ledger = MessageLedger(path)
    with ledger.atomic():
        ledger.record("m3", "sent")
        ledger.keep_frame("r3", report_frame("m3", "sent"))
    reloaded = MessageLedger(path)

    assert reloaded.get("m1") is not None
    assert reloaded.get("m1").status == "delivered"  # type: ignore[union-attr]
    assert reloaded.get("m2") is not None
    assert reloaded.get("m2").retryable is False  # type: ignore[union-attr]
    assert reloaded.get("m3") is not None
    assert list(reloaded.unacknowledged_frames()) == ["r2", "r3"]


async def test_kill_between_outcome_and_report_keeps_report(
    settings: Settings,
    session_factory: Sessions,
    redis: Redis,
    redis_keys: RedisKeys,
    tmp_path: Path,
) -> None:
    device_id, user_id, api_key = await create_device(session_factory)
    port = free_port()
    state_file = tmp_path / "state.jsonl"
    # The child kills itself when it opens the state file to write after a `delivered`
    # line is in it. In a ledger that writes an outcome and its report frame apart, that
    # open is the one for the frame.
    script = KILL_HOOK + textwrap.dedent(
        """
        STATE_FILE = os.path.abspath(sys.argv[1])


        def kill_when(event, args):
            if event != "open" or opened_path(args) != STATE_FILE:
                return False
            if not is_write(args[1], args[2]) or not os.path.exists(STATE_FILE):
                return False
            with open(STATE_FILE, "rb") as file:
                return b'"delivered"' in file.read()


        from mensajero_agent.cli import main

        sys.addaudithook(hook)
        main(sys.argv[2:])
        """
    )

    async with contextlib.AsyncExitStack() as first_hub:
        url = await first_hub.enter_async_context(serve_hub_on(settings, port))
        message_id = await queue_message(
            session_factory, redis, redis_keys, device_id, user_id
        )
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            str(state_file),
            "--state-file",
            str(state_file),
            "--url",
            url,
            "--send-delay-ms",
            "0",
            "--delivery-delay-ms",
            str(int(scaled(1.5) * 1000)),
            "--backoff-max-s",
            "0.2",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "MENSAJERO_DEVICE_API_KEY": api_key},
        )
        try:
            # `delivered` comes while the hub is down, so only the state file can keep
            # its report.
            await read_events_until(child, "report_ack", status="sent")
            await first_hub.aclose()
            await read_events_until(child, "report", status="delivered")
            async with asyncio.timeout(scaled(5)):
                # Polls a file that another process writes.
                while b'"delivered"' not in state_file.read_bytes():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                # Let an agent that writes the frame apart reach that write and die.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(child.wait(), 0.5)
        finally:
            if child.returncode is None:
                child.kill()
            await child.communicate()
    unacknowledged = MessageLedger(state_file).unacknowledged_frames()

    async with (
        serve_hub_on(settings, port) as url,
        running_agent(
            url, api_key, SimulatedBackend(), ledger=MessageLedger(state_file)
        ) as (_, events, _),
    ):
        await events.wait_for(
            "report_ack", message_id=str(message_id), status="delivered"
        )
    row = await load_message(session_factory, message_id)

    assert child.returncode == -signal.SIGKILL
    assert [frame["status"] for frame in unacknowledged.values()] == ["delivered"]
    assert row.status == MessageStatus.DELIVERED


async def read_events_until(
    child: asyncio.subprocess.Process, name: str, **fields: Any
) -> dict[str, Any]:
    """Read the child's JSON-line events until one named `name` has `fields`."""
    assert child.stdout is not None
    seen: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(scaled(10)):
            while line := await child.stdout.readline():
                event = orjson.loads(line)
                seen.append(event)
                if event["event"] == name and all(
                    event.get(key) == value for key, value in fields.items()
                ):
                    return dict(event)
    except TimeoutError:
        raise AssertionError(f"no {name} event with {fields}; events: {seen}") from None
    raise AssertionError(f"the agent ended without a {name} event; events: {seen}")


# Compaction.


def run_report_cycle(ledger: MessageLedger, index: int, *, acknowledge: bool) -> None:
    """Record one message as the agent does, from `sending` to `delivered`."""
    message_id = f"m{index}"
    ledger.record(message_id, "sending", attempt=1)
    ledger.record(message_id, "sent", attempt=1)
    ledger.keep_frame(f"sent-{index}", report_frame(message_id, "sent"))
    ledger.drop_frame(f"sent-{index}")
    ledger.record(message_id, "delivered", attempt=1)
    ledger.keep_frame(f"delivered-{index}", report_frame(message_id, "delivered"))
    if acknowledge:
        ledger.drop_frame(f"delivered-{index}")


def test_ledger_file_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "state.jsonl"
    max_records = 200
    messages = 12_000
    ledger = MessageLedger(path, max_records=max_records)
    unacknowledged = []
    max_lines = 0

    for index in range(messages):
        acknowledge = index % 1000 != 0
        run_report_cycle(ledger, index, acknowledge=acknowledge)
        if not acknowledge:
            unacknowledged.append(f"delivered-{index}")
        if index % 100 == 0:
            max_lines = max(max_lines, line_count(path))
        if index % 3000 == 2999:
            ledger = MessageLedger(path, max_records=max_records)
    reloaded = MessageLedger(path, max_records=max_records)

    # Without compaction the file would hold 7 lines per message, 84,000 in all.
    assert max_lines <= COMPACTION_MIN_LINES
    assert line_count(path) <= COMPACTION_MIN_LINES
    assert list(reloaded.unacknowledged_frames()) == unacknowledged
    assert len(reloaded) == max_records
    assert reloaded.get(f"m{messages - 1}") is not None
    assert reloaded.get(f"m{messages - max_records}") is not None
    assert reloaded.get(f"m{messages - max_records - 1}") is None


def test_ledger_compacts_at_load(tmp_path: Path) -> None:
    path = tmp_path / "state.jsonl"
    # An uncompacted file of an earlier version: outcomes and frames on their own lines.
    lines: list[dict[str, Any]] = []
    for index in range(500):
        message_id = f"m{index}"
        lines.append({"message_id": message_id, "status": "sending"})
        lines.append({"message_id": message_id, "status": "sent"})
        lines.append({"outbox": f"r{index}", "frame": report_frame(message_id, "sent")})
        if index != 7:
            lines.append({"acknowledged": f"r{index}"})
    path.write_bytes(
        b"".join(orjson.dumps(line) + b"\n" for line in lines) + b'{"message_id": "m'
    )

    ledger = MessageLedger(path)
    reloaded = MessageLedger(path)

    assert len(lines) > COMPACTION_MIN_LINES
    assert line_count(path) == 501
    assert len(ledger) == 500
    assert list(ledger.unacknowledged_frames()) == ["r7"]
    assert ledger_state(reloaded, [f"m{i}" for i in range(500)]) == ledger_state(
        ledger, [f"m{i}" for i in range(500)]
    )


def compaction_step(ledger: MessageLedger, index: int) -> None:
    """Apply step `index` of a sequence whose superseded lines soon call for compaction.

    Every message takes four steps, and the frame of every third one stays unacknowledged.
    """
    message_id = f"m{index // 4}"
    request_id = f"r{index // 4}"
    match index % 4:
        case 0:
            ledger.record(message_id, "sending")
        case 1:
            ledger.record(message_id, "sent")
        case 2:
            ledger.keep_frame(request_id, report_frame(message_id, "sent"))
        case _:
            if index // 4 % 3 != 0:
                ledger.drop_frame(request_id)


# The child takes compaction_step until its first compaction, printing the index of each
# step before taking it, and kills itself at the crash point named in its arguments.
COMPACTION_CHILD = (
    KILL_HOOK
    + textwrap.dedent(
        """
        from pathlib import Path
        from typing import Any

        from mensajero_agent import MessageLedger

        STATE_FILE = os.path.abspath(sys.argv[1])
        FOLDER = os.path.dirname(STATE_FILE)
        CRASH_POINT = sys.argv[2]


        def kill_when(event, args):
            if CRASH_POINT == "rename":
                return event == "os.rename"
            if event != "open":
                return False
            path = opened_path(args)
            if CRASH_POINT == "folder fsync":
                return path == FOLDER
            # A file beside the state file opened to write: the temporary file.
            return (
                path is not None
                and path != STATE_FILE
                and os.path.dirname(path) == FOLDER
                and is_write(args[1], args[2])
            )


        """
    )
    + inspect.getsource(report_frame)
    + "\n\n"
    + inspect.getsource(compaction_step)
    + textwrap.dedent(
        """

        sys.addaudithook(hook)
        ledger = MessageLedger(Path(STATE_FILE))
        for index in range(2_000):
            print(index, flush=True)
            compaction_step(ledger, index)
        """
    )
)


@pytest.mark.parametrize("crash_point", ["temporary file", "rename", "folder fsync"])
def test_crash_during_compaction_keeps_state(tmp_path: Path, crash_point: str) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    path = folder / "state.jsonl"

    child = subprocess.run(
        [sys.executable, "-c", COMPACTION_CHILD, str(path), crash_point],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )
    last_step = int(child.stdout.split()[-1])
    # The step that was cut short had written its line before it started compacting.
    expected = MessageLedger(tmp_path / "expected.jsonl")
    for index in range(last_step + 1):
        compaction_step(expected, index)
    message_ids = [f"m{i}" for i in range(last_step // 4 + 1)]
    files_after_crash = sorted(entry.name for entry in folder.iterdir())

    reloaded = MessageLedger(path)

    assert child.returncode == -signal.SIGKILL, child.stderr
    assert ledger_state(reloaded, message_ids) == ledger_state(expected, message_ids)
    assert len(reloaded) == len(expected)
    if crash_point == "rename":
        assert len(files_after_crash) == 2
    assert sorted(entry.name for entry in folder.iterdir()) == ["state.jsonl"]


def load_copy(path: Path) -> MessageLedger:
    """Load a copy of a state file, because loading may compact the file itself."""
    copy = path.with_name("copy-" + path.name)
    shutil.copyfile(path, copy)
    try:
        return MessageLedger(copy)
    finally:
        copy.unlink()


def test_failed_rename_keeps_file_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.jsonl"
    ledger = MessageLedger(path)
    failures = 0
    replacements = 0
    real_replace = os.replace

    def fail_once(source: Any, destination: Any) -> None:
        nonlocal failures, replacements
        if failures == 0:
            failures += 1
            raise OSError(28, "No space left on device")
        real_replace(source, destination)
        replacements += 1

    monkeypatch.setattr(os, "replace", fail_once)
    with caplog.at_level(logging.WARNING):
        index = 0
        while failures == 0 and index < 5_000:
            compaction_step(ledger, index)
            index += 1
    lines_after_failure = line_count(path)
    files_after_failure = sorted(entry.name for entry in tmp_path.iterdir())
    message_ids = [f"m{i}" for i in range(index // 4 + 1)]
    state_in_memory = ledger_state(ledger, message_ids)
    state_in_file = ledger_state(load_copy(path), message_ids)

    # The next attempt waits until the file has doubled. Only updates follow, so the
    # live state stays the same size.
    for update_index in range(3 * lines_after_failure):
        ledger.record(f"m{update_index % 10}", "delivered")

    assert failures == 1
    assert replacements >= 1
    assert "No space left on device" in caplog.text
    assert files_after_failure == ["state.jsonl"]
    assert lines_after_failure > COMPACTION_MIN_LINES
    assert state_in_file == state_in_memory
    assert line_count(path) < 3 * lines_after_failure
    assert ledger_state(load_copy(path), message_ids) == ledger_state(
        ledger, message_ids
    )
