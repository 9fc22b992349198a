"""Silence deadlines of every connection of a hub, checked by one periodic sweep.

One hub holds 10,000 and more idle connections, so a timer or task per connection would
cost more than the connections themselves. Instead each connection has one entry in a
heap, keyed by the deadline it had when the entry was pushed. A frame only updates the
connection's last activity (no heap work); the sweep pops the entries whose stored deadline
has passed and either reports the connection as silent or pushes it again with its real
deadline. Each connection is therefore popped about once per timeout, whatever its traffic.
"""

import heapq
import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class DeadlineQueue(Generic[Item]):
    def __init__(
        self,
        timeout_s: float,
        last_activity_s: Callable[[Item], float],
        is_open: Callable[[Item], bool],
    ) -> None:
        self.timeout_s = timeout_s
        self._last_activity_s = last_activity_s
        self._is_open = is_open
        # The counter breaks deadline ties, so items themselves are never compared.
        self._heap: list[tuple[float, int, Item]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, item: Item) -> None:
        deadline_s = self._last_activity_s(item) + self.timeout_s
        heapq.heappush(self._heap, (deadline_s, next(self._counter), item))

    def compact(self, open_count: int) -> None:
        """Drop the entries of closed items once they are most of the heap.

        A closed item otherwise stays until its deadline passes, which keeps the memory
        of every connection closed in the last timeout; the rebuild is linear, and runs
        only after as many closes as there are open items.
        """
        if len(self._heap) <= 2 * open_count + 64:
            return
        self._heap = [entry for entry in self._heap if self._is_open(entry[2])]
        heapq.heapify(self._heap)

    def pop_expired(self, now_s: float) -> list[Item]:
        """Return the open items silent for the timeout; closed items leave the heap here."""
        expired: list[Item] = []
        while self._heap and self._heap[0][0] <= now_s:
            _, _, item = heapq.heappop(self._heap)
            if not self._is_open(item):
                continue
            deadline_s = self._last_activity_s(item) + self.timeout_s
            if deadline_s <= now_s:
                expired.append(item)
            else:
                heapq.heappush(self._heap, (deadline_s, next(self._counter), item))
        return expired


def sweep_interval_s(timeout_s: float) -> float:
    """Return how often the sweep runs: a quarter of the timeout, at most every 5 seconds.

    A silent connection is closed between `timeout_s` and `timeout_s` plus this interval.
    """
    return max(0.05, min(5.0, timeout_s / 4))
