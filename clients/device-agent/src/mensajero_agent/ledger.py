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
kept, because the server offers their task again.
"""

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

# The oldest records are forgotten beyond this many messages, to bound memory; the server
# stops offering a task once it has a final report, so only very old tasks are forgotten.
DEFAULT_MAX_RECORDS = 100_000


@dataclass(frozen=True)
class Outcome:
    status: str
    error: str | None = None
    # The task's attempt; None for tasks of servers that send no attempt.
    attempt: int | None = None
    # False when a `failed` send may have gone out anyway, so it must never be retried.
    retryable: bool = True


class MessageLedger:
    def __init__(
        self, path: Path | None = None, max_records: int = DEFAULT_MAX_RECORDS
    ) -> None:
        self.path = path
        self.max_records = max_records
        self._records: OrderedDict[str, Outcome] = OrderedDict()
        # request_id → frame of each outbox entry kept in the file and not acknowledged.
        self._unacknowledged: OrderedDict[str, dict[str, Any]] = OrderedDict()
        if path is not None and path.exists():
            self._load(path)
        elif path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self._records)

    def get(self, message_id: str) -> Outcome | None:
        return self._records.get(message_id)

    def record(
        self,
        message_id: str,
        status: str,
        error: str | None = None,
        *,
        attempt: int | None = None,
        retryable: bool = True,
    ) -> None:
        outcome = Outcome(status, error, attempt, retryable)
        self._remember(message_id, outcome)
        if self.path is not None:
            line = {
                "message_id": message_id,
                "status": status,
                "error": error,
                "attempt": attempt,
                "retryable": retryable,
            }
            self._append(line)

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

    def _append(self, line: dict[str, Any]) -> None:
        self._append_raw(orjson.dumps(line) + b"\n")

    def _append_raw(self, data: bytes) -> None:
        assert self.path is not None
        with self.path.open("ab") as file:
            file.write(data)

    def _remember(self, message_id: str, outcome: Outcome) -> None:
        self._records[message_id] = outcome
        self._records.move_to_end(message_id)
        while len(self._records) > self.max_records:
            self._records.popitem(last=False)

    def _load(self, path: Path) -> None:
        with path.open("rb") as file:
            for line in file:
                try:
                    item = orjson.loads(line)
                    if "outbox" in item:
                        self._unacknowledged[str(item["outbox"])] = dict(item["frame"])
                        continue
                    if "acknowledged" in item:
                        self._unacknowledged.pop(str(item["acknowledged"]), None)
                        continue
                    self._remember(
                        str(item["message_id"]),
                        Outcome(
                            str(item["status"]),
                            item.get("error"),
                            item.get("attempt"),
                            bool(item.get("retryable", True)),
                        ),
                    )
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
