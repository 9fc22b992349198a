"""configure_garbage_collector runs in a child process, which it may freeze."""

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import gc
    import weakref

    from mensajero_common.startup import (
        YOUNG_COLLECTION_THRESHOLD,
        configure_garbage_collector,
    )


    class Node:
        pass


    # No automatic collection may remove the garbage below before the call does.
    gc.disable()
    live_nodes = [Node() for _ in range(1000)]
    # A cycle that is garbage before the freeze, which must be collected, not frozen.
    # It reaches the oldest generation first, so a young collection cannot free it.
    garbage = Node()
    garbage.self = garbage
    collected = weakref.ref(garbage)
    gc.collect()
    del garbage
    tracked_before = len(gc.get_objects())

    configure_garbage_collector()

    print(collected() is None)
    print(gc.get_freeze_count() >= len(live_nodes))
    print(len(gc.get_objects()) < tracked_before // 10)
    print(gc.get_threshold()[0] == YOUNG_COLLECTION_THRESHOLD)
    """
)


def test_collector_configured_at_startup() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    garbage_collected, live_frozen, few_tracked, young_threshold = result.stdout.split()
    assert garbage_collected == "True"
    assert live_frozen == "True"
    assert few_tracked == "True"
    assert young_threshold == "True"


PERIODIC_CHILD = textwrap.dedent(
    """
    import gc
    import time
    import weakref

    from mensajero_common.startup import (
        YOUNG_COLLECTION_THRESHOLD,
        start_full_collections,
    )


    class Node:
        pass


    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, 10, 10)
    # A cycle that reaches the oldest generation while alive, then becomes garbage, as
    # the objects of a closed connection do. No young collection can free it.
    garbage = Node()
    garbage.self = garbage
    collected = weakref.ref(garbage)
    gc.collect()
    del garbage

    start_full_collections(0.2)
    deadline = time.monotonic() + 10
    while collected() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    print(collected() is None)
    """
)


def test_full_collection_runs_periodically() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PERIODIC_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]
