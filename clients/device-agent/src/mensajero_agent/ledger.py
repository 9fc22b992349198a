"""The record of every task the agent has handled, so no message is sent twice.

The server offers a task again until it gets a final report, for instance after a
reconnect. The agent then reports the outcome it recorded instead of sending again. Only a
new `attempt` of a message whose recorded send failed with nothing sent is sent again:
that is the server's retry. With a file, the record survives restarts: each change is
appended as one JSON line, and the last line of a message wins when the file is read back.

With a file, the ledger also keeps the outbox: every report and incoming SMS frame that
waits for its `ack`, as the device protocol requires. The server offers a task again
only while its message is `assigned` or `sending`, so a `delivered` report lost with
the agent's memory would leave the message `sent` for good. `sending` claims are not
kept, because the server offers their task again. For the same reason, a `sent` record
whose delivery report has not come yet is marked `delivery_due`, so that the agent
waits for that report again after a restart.

The changes made inside one `atomic()` block, such as an outcome and the report frame
that carries it, are appended as one line with one write call. A crash of the agent,
kill -9 included, can at most cut that last line short, and the loader skips such a line,
so the block is kept whole or not at all. Appends are not fsynced, so a power loss may
also lose the newest lines. Files of earlier versions, which wrote an outcome and its
frame as two lines, still load.

The file is compacted once it has more than max(COMPACTION_MIN_LINES, COMPACTION_FACTOR
× live entries) lines, and when a file of that size is loaded. See `_compact`.
"""

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

logger = logging.getLogger(__name__)

# The oldest records are forgotten beyond this many messages, to bound memory; the server
# stops offering a task once it has a final report, so only very old tasks are forgotten.
DEFAULT_MAX_RECORDS = 100_000

# The file is rewritten with only its live entries (records and kept frames) once it has
# more than max(COMPACTION_MIN_LINES, COMPACTION_FACTOR × live entries) lines. With a
# factor of 2, a rewrite of L lines comes only after about L / 2 or more appended lines,
# so compaction adds a bounded number of line writes per append. The floor spares small
# files.
COMPACTION_MIN_LINES = 1_000
COMPACTION_FACTOR = 2

# Suffix of the file that a compaction writes before renaming it over the state file. A
# crash can leave it behind. It is never read, and the next load deletes it.
COMPACTION_SUFFIX = ".compacting"


@dataclass(frozen=True)
class Outcome:
    status: str
    error: str | None = None
    # The task's attempt; None for tasks of servers that send no attempt.
    attempt: int | None = None
    # False when a `failed` send may have gone out anyway, so it must never be retried.
    retryable: bool = True
    # True on a `sent` record whose delivery report the agent still waits for.
    delivery_due: bool = False


class MessageLedger:
    def __init__(
        self, path: Path | None = None, max_records: int = DEFAULT_MAX_RECORDS
    ) -> None:
        self.path = path
        self.max_records = max_records
        self._records: OrderedDict[str, Outcome] = OrderedDict()
        # request_id → frame of each outbox entry kept in the file and not acknowledged.
        self._unacknowledged: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # Lines in the file, cut-short and superseded ones included.
        self._line_count = 0
        # Changes of the open `atomic()` blocks, written when the outermost one ends.
        self._atomic_depth = 0
        self._pending_changes: list[dict[str, Any]] = []
        # Raised after a failed compaction, so that the next attempt waits until the
        # file has doubled instead of following every append.
        self._compaction_min_lines = COMPACTION_MIN_LINES
        if path is not None and path.exists():
            self._load(path)
        elif path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self._records)

    def get(self, message_id: str) -> Outcome | None:
        return self._records.get(message_id)

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Append every change made inside the block to the file as one line.

        Blocks may nest, and only the outermost one writes. Without a file this does
        nothing.
        """
        self._atomic_depth += 1
        try:
            yield
        finally:
            self._atomic_depth -= 1
            # The changes are in memory already, so they are written even when the block
            # raised, because the file must not fall behind what the agent acts on.
            if self._atomic_depth == 0 and self._pending_changes:
                changes, self._pending_changes = self._pending_changes, []
                self._write_changes(changes)

    def record(
        self,
        message_id: str,
        status: str,
        error: str | None = None,
        *,
        attempt: int | None = None,
        retryable: bool = True,
        delivery_due: bool = False,
    ) -> None:
        outcome = Outcome(status, error, attempt, retryable, delivery_due)
        self._remember(message_id, outcome)
        if self.path is not None:
            self._append(_record_line(message_id, outcome))

    def deliveries_due(self) -> list[tuple[str, Outcome]]:
        """Return the `sent` records whose delivery report is still due, oldest first."""
        return [
            (message_id, outcome)
            for message_id, outcome in self._records.items()
            if outcome.status == "sent" and outcome.delivery_due
        ]

    def unacknowledged_frames(self) -> dict[str, dict[str, Any]]:
        """Return the kept outbox frames by request_id, oldest first."""
        return dict(self._unacknowledged)

    def keep_frame(self, request_id: str, frame: dict[str, Any]) -> None:
        """Keep an outbox frame in the file until `drop_frame` removes it.

        Without a file, the agent's own outbox is the only copy, so this does nothing.
        """
        if self.path is None:
            return
        self._unacknowledged[request_id] = frame
        self._append({"outbox": request_id, "frame": frame})

    def drop_frame(self, request_id: str) -> None:
        """Forget an outbox frame once it is acknowledged or rejected for good."""
        if self._unacknowledged.pop(request_id, None) is None:
            return
        self._append({"acknowledged": request_id})

    # Writing.

    def _append(self, change: dict[str, Any]) -> None:
        if self._atomic_depth > 0:
            self._pending_changes.append(change)
            return
        self._write_changes([change])

    def _write_changes(self, changes: list[dict[str, Any]]) -> None:
        line = changes[0] if len(changes) == 1 else {"changes": changes}
        self._append_raw(orjson.dumps(line) + b"\n")
        self._line_count += 1
        if self._compaction_due():
            self._compact()

    def _append_raw(self, data: bytes) -> None:
        """Append `data` with one write call, unless the system writes only part of it."""
        assert self.path is not None
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            os.close(fd)

    # Compaction.

    def _live_entry_count(self) -> int:
        return len(self._records) + len(self._unacknowledged)

    def _compaction_due(self) -> bool:
        limit = max(
            self._compaction_min_lines, COMPACTION_FACTOR * self._live_entry_count()
        )
        return self._line_count > limit

    def _compact(self) -> None:
        """Rewrite the file with only the live records and kept frames.

        A crash at any step leaves either the old file or the new one, each complete.
        The new content goes to a temporary file in the same folder and is fsynced.
        Then os.replace renames it over the old file in one step, and the folder is
        fsynced so that the rename itself survives a power loss. A failure leaves the
        old file in use, and the next attempt waits until that file has doubled.
        """
        assert self.path is not None
        temporary = self._compaction_path()
        try:
            self._write_live_state(temporary)
            os.replace(temporary, self.path)
        except OSError as error:
            logger.warning(
                "Compacting state file %s failed (%s). The agent keeps appending to it "
                "and tries again once it has doubled. Check the free space and the "
                "permissions of its folder.",
                self.path,
                error,
            )
            temporary.unlink(missing_ok=True)
            self._compaction_min_lines = 2 * self._line_count
            return

        self._line_count = self._live_entry_count()
        self._compaction_min_lines = COMPACTION_MIN_LINES
        try:
            _fsync_folder(self.path.parent)
        except OSError as error:
            # The rename is done and later appends go to the new file, so only a power
            # loss right now could bring the old, equally valid, file back.
            logger.warning(
                "fsync of folder %s after compacting failed: %s",
                self.path.parent,
                error,
            )

    def _write_live_state(self, temporary: Path) -> None:
        assert self.path is not None
        # The new file keeps the permissions of the old one, which may hold SMS bodies.
        mode = os.stat(self.path).st_mode & 0o777
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with open(fd, "wb") as file:
            # os.open applies the umask to `mode`.
            os.chmod(temporary, mode)
            for message_id, outcome in self._records.items():
                file.write(orjson.dumps(_record_line(message_id, outcome)) + b"\n")
            for request_id, frame in self._unacknowledged.items():
                file.write(orjson.dumps({"outbox": request_id, "frame": frame}) + b"\n")
            file.flush()
            os.fsync(fd)

    def _compaction_path(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + COMPACTION_SUFFIX)

    # Reading.

    def _remember(self, message_id: str, outcome: Outcome) -> None:
        self._records[message_id] = outcome
        self._records.move_to_end(message_id)
        while len(self._records) > self.max_records:
            self._records.popitem(last=False)

    def _load(self, path: Path) -> None:
        # A compaction that a crash interrupted before its rename leaves this file. The
        # state file itself is complete.
        self._compaction_path().unlink(missing_ok=True)

        with path.open("rb") as file:
            for line in file:
                self._line_count += 1
                try:
                    self._apply(orjson.loads(line))
                except (ValueError, KeyError, TypeError):
                    # A line cut short by a crash while it was written (orjson's
                    # JSONDecodeError is a ValueError).
                    continue
            # Ends such a line, so that the next line appended is not joined to it and
            # lost with it on the next read.
            if file.tell() > 0:
                file.seek(-1, os.SEEK_END)
                if file.read(1) != b"\n":
                    self._append_raw(b"\n")

        if self._compaction_due():
            self._compact()

    def _apply(self, item: dict[str, Any]) -> None:
        """Apply one line of the file to the state in memory."""
        if "changes" in item:
            # The changes of one `atomic()` block. The line parsed, so it is whole.
            for change in item["changes"]:
                self._apply(change)
            return
        if "outbox" in item:
            self._unacknowledged[str(item["outbox"])] = dict(item["frame"])
            return
        if "acknowledged" in item:
            self._unacknowledged.pop(str(item["acknowledged"]), None)
            return
        self._remember(
            str(item["message_id"]),
            Outcome(
                str(item["status"]),
                item.get("error"),
                item.get("attempt"),
                bool(item.get("retryable", True)),
                # Absent from the lines of earlier versions.
                bool(item.get("delivery_due", False)),
            ),
        )


def _record_line(message_id: str, outcome: Outcome) -> dict[str, Any]:
    line: dict[str, Any] = {
        "message_id": message_id,
        "status": outcome.status,
        "error": outcome.error,
        "attempt": outcome.attempt,
        "retryable": outcome.retryable,
    }
    if outcome.delivery_due:
        line["delivery_due"] = True
    return line


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries, such as a rename in it, to disk (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
