"""Process setup that every service runs once, before it starts serving."""

import gc
import threading
import time
from typing import Any

# Allocations of tracked objects, net of deallocations, between two young collections
# (Python 3.11's default is 700). Fewer young collections move fewer short-lived objects
# into the old generation, and so start fewer full collections.
YOUNG_COLLECTION_THRESHOLD = 10_000
# A full collection runs at least this often. With the threshold above, and objects freed
# by reference counting also counting back down, a quiet service may go hours without
# one. A soak run of 37 minutes saw none in the device-hub, the dispatcher or the API.
# Their memory grew by about 0.5 MB a minute, with cycles that had reached the oldest
# generation before they became garbage, such as the objects of closed WebSockets.
FULL_COLLECTION_INTERVAL_S = 600.0


def configure_garbage_collector() -> None:
    """Freeze every object alive at the call and make young collections rarer.

    Imports, the app and its settings leave 110,000 to 150,000 objects (modules,
    classes, functions) that live as long as the process, and every full collection
    walked them all. In the full benchmark (`BENCH_MODE=full make bench`), that stopped
    a service's event loop for 40 to 110 ms at a time. `gc.freeze` moves them to the
    permanent generation, which collections skip, after a collection so that no garbage
    is frozen with them.

    NOTE: a frozen object that later becomes part of an unreachable cycle is never
    freed, nor is what it references. Objects freed by reference counting are freed as
    usual. So call it only once what exists lives until the process exits.

    The higher young threshold matters most to the device-hub, whose long-lived objects
    grow with its connections. While 19,000 phones connected in that benchmark, its full
    collections took 9.4 s of CPU with the default threshold (1.1 s each at the end)
    and 1.2 to 1.4 s with this one. It accepted 450 to 485 connections per second
    instead of 300 to 330.

    A thread then runs a full collection whenever FULL_COLLECTION_INTERVAL_S has passed
    without one (see start_full_collections).

    Call it in `main`, not in an app's lifespan, so that tests that start many apps in
    one process neither pay a collection per app nor freeze their fixtures.
    """
    gc.collect()
    gc.freeze()
    _, middle_threshold, old_threshold = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle_threshold, old_threshold)
    start_full_collections(FULL_COLLECTION_INTERVAL_S)


def start_full_collections(interval_s: float) -> threading.Thread:
    """Start a daemon thread that runs a full collection whenever `interval_s` has passed
    since the last one, automatic or not.

    The collection holds the GIL, so it pauses the event loop as an automatic one would:
    the device-hub's took up to 0.9 s with 19,000 connections in the full benchmark.
    """
    last_full_at = time.monotonic()

    def note_full_collection(phase: str, info: dict[str, Any]) -> None:
        nonlocal last_full_at
        if phase == "stop" and info["generation"] == 2:
            last_full_at = time.monotonic()

    def collect_forever() -> None:
        while True:
            time.sleep(max(0.0, last_full_at + interval_s - time.monotonic()))
            if time.monotonic() - last_full_at >= interval_s:
                gc.collect()

    gc.callbacks.append(note_full_collection)
    thread = threading.Thread(
        target=collect_forever, name="full-garbage-collection", daemon=True
    )
    thread.start()
    return thread
