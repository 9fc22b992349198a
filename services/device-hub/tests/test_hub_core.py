import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from mensajero_hub.core.heartbeat import DeadlineQueue, sweep_interval_s
from mensajero_hub.core.session import DeviceSession
from mensajero_hub.core.state import (
    MAX_CONSECUTIVE_ERRORS,
    CarriedTask,
    ConnectionState,
    TaskEntry,
    connection_key_ttl_s,
    heartbeat_touch_interval_s,
    parse_carried_task,
    stream_id_order,
)


@dataclass(eq=False)
class Connection:
    name: str
    last_frame_at_s: float
    open: bool = True


def deadline_queue(timeout_s: float) -> DeadlineQueue[Connection]:
    return DeadlineQueue(
        timeout_s,
        last_activity_s=lambda connection: connection.last_frame_at_s,
        is_open=lambda connection: connection.open,
    )


def new_state() -> ConnectionState:
    return ConnectionState(
        device_id=uuid.uuid4(),
        connection_id="c1",
        opened_at_s=0.0,
        last_frame_at_s=0.0,
        last_touch_at_s=0.0,
    )


def entry(stream_id: bytes, message_id: uuid.UUID) -> TaskEntry:
    return TaskEntry(stream_id, message_id, {"type": "task"})


def test_deadline_queue_expires_silent_only() -> None:
    queue = deadline_queue(10)
    silent = Connection("silent", 0.0)
    chatty = Connection("chatty", 0.0)
    queue.add(silent)
    queue.add(chatty)
    chatty.last_frame_at_s = 8.0

    assert queue.pop_expired(9.9) == []
    assert queue.pop_expired(10.0) == [silent]
    assert queue.pop_expired(17.9) == []
    assert queue.pop_expired(18.0) == [chatty]
    assert len(queue) == 0


def test_deadline_queue_drops_closed_items() -> None:
    queue = deadline_queue(5)
    closed = Connection("closed", 0.0, open=False)
    queue.add(closed)

    assert queue.pop_expired(100.0) == []
    assert len(queue) == 0


def test_deadline_queue_pops_each_item_once_per_timeout() -> None:
    queue = deadline_queue(10)
    connections = [Connection(str(i), 0.0) for i in range(1000)]
    for connection in connections:
        queue.add(connection)
    for connection in connections:
        connection.last_frame_at_s = 5.0

    # Every entry is due at 10 s and moves to 15 s, so nothing expires yet.
    assert queue.pop_expired(10.0) == []
    assert len(queue) == 1000
    assert len(queue.pop_expired(15.0)) == 1000


def test_deadline_queue_compacts_closed_items() -> None:
    queue = deadline_queue(300)
    connections = [Connection(str(i), 0.0) for i in range(200)]
    for connection in connections:
        queue.add(connection)

    for connection in connections[:100]:
        connection.open = False
    queue.compact(open_count=100)
    assert len(queue) == 200

    for connection in connections[100:150]:
        connection.open = False
    queue.compact(open_count=50)
    assert len(queue) == 50
    assert queue.pop_expired(300.0) == connections[150:]


def test_sweep_interval_bounds() -> None:
    assert sweep_interval_s(300) == 5.0
    assert sweep_interval_s(1) == 0.25
    assert sweep_interval_s(0.1) == 0.05


def test_select_unpushed_skips_pushed_and_repeats() -> None:
    state = new_state()
    first, second = uuid.uuid4(), uuid.uuid4()
    state.mark_pushed(entry(b"1-0", first))

    selected = state.select_unpushed(
        [entry(b"1-0", first), entry(b"2-0", second), entry(b"3-0", second)]
    )

    assert selected == [entry(b"2-0", second)]


def test_mark_pushed_refuses_twice() -> None:
    state = new_state()
    message_id = uuid.uuid4()

    assert state.mark_pushed(entry(b"1-0", message_id))
    assert not state.mark_pushed(entry(b"2-0", message_id))
    state.forget(message_id)
    assert state.mark_pushed(entry(b"3-0", message_id))


def test_advance_cursor_keeps_last_id() -> None:
    state = new_state()
    state.advance_cursor([entry(b"1-0", uuid.uuid4()), entry(b"5-1", uuid.uuid4())])
    state.advance_cursor([])

    assert state.read_cursor == b"5-1"


def test_error_counter_closes_at_limit() -> None:
    state = new_state()
    results = [state.record_error() for _ in range(MAX_CONSECUTIVE_ERRORS)]
    state.record_success()

    assert results[:-1] == [False] * (MAX_CONSECUTIVE_ERRORS - 1)
    assert results[-1] is True
    assert state.consecutive_errors == 0


def test_needs_touch_after_interval() -> None:
    state = new_state()

    assert not state.needs_touch(29.9, 30.0)
    assert state.needs_touch(30.0, 30.0)


@pytest.mark.parametrize("early_s", [0.0, 0.5, -0.5, 5.0])
def test_touch_on_every_second_ping(early_s: float) -> None:
    ping_interval_s = 60.0
    interval_s = heartbeat_touch_interval_s(ping_interval_s)
    state = new_state()
    touched = []
    for ping in range(1, 9):
        now_s = ping * (ping_interval_s - early_s)
        if state.needs_touch(now_s, interval_s):
            state.record_touch(now_s, datetime.now(UTC))
            touched.append(ping)

    assert touched == [2, 4, 6, 8]


def test_connection_key_outlives_heartbeat_timeout() -> None:
    assert connection_key_ttl_s(300, 60) == 390
    assert connection_key_ttl_s(1, 1) == 3
    assert connection_key_ttl_s(10, 15) == 33


def test_idle_state_keeps_no_pushed_dict() -> None:
    state = new_state()
    message_id = uuid.uuid4()

    assert state.pushed is None
    assert state.mark_pushed(entry(b"1-0", message_id))
    assert state.pushed == {message_id: None}
    state.forget(message_id)
    assert state.pushed is None


def test_session_has_no_instance_dict() -> None:
    # A class without __slots__ gets a `__dict__` descriptor, and each instance a dict.
    assert "__dict__" not in vars(DeviceSession)


def carried(previous_id: bytes | None, stream_id: bytes) -> CarriedTask:
    return CarriedTask(previous_id, entry(stream_id, uuid.uuid4()))


def test_take_carried_follows_cursor() -> None:
    state = new_state()
    state.read_cursor = b"5-0"
    first, second = carried(b"5-0", b"6-0"), carried(b"6-0", b"7-0")

    assert state.take_carried([first, second]) == [first.entry, second.entry]
    assert state.read_cursor == b"7-0"


def test_take_carried_after_deleted_entries() -> None:
    # The entry before the task is older than the cursor, so no entry can be missing.
    state = new_state()
    state.read_cursor = b"5-0"
    task = carried(b"3-0", b"6-0")

    assert state.take_carried([task]) == [task.entry]
    assert state.read_cursor == b"6-0"


def test_take_carried_skips_read_entries() -> None:
    state = new_state()
    state.read_cursor = b"7-0"

    assert state.take_carried([carried(b"5-0", b"6-0"), carried(b"6-0", b"7-0")]) == []
    assert state.read_cursor == b"7-0"


def test_take_carried_gap_needs_read() -> None:
    state = new_state()
    state.read_cursor = b"5-0"

    assert (
        state.take_carried([carried(b"5-0", b"6-0"), carried(b"6-5", b"7-0")]) is None
    )
    assert state.read_cursor == b"5-0"


def test_take_carried_without_cursor() -> None:
    state = new_state()
    task = carried(None, b"6-0")

    assert state.take_carried([carried(b"5-0", b"6-0")]) is None
    assert state.take_carried([task]) == [task.entry]
    assert state.read_cursor == b"6-0"


def test_stream_id_order_compares_numbers() -> None:
    assert stream_id_order(b"10-0") > stream_id_order(b"9-0")
    assert stream_id_order(b"9-10") > stream_id_order(b"9-2")


def test_parse_carried_task_reads_fields() -> None:
    message_id = uuid.uuid4()
    data = b"task 5-0 6-1 " + str(message_id).encode() + b' {"type":"task","attempt":2}'

    parsed = parse_carried_task(data)

    assert parsed is not None
    assert parsed.previous_id == b"5-0"
    assert parsed.entry.stream_id == b"6-1"
    assert parsed.entry.message_id == message_id
    assert parsed.entry.attempt == 2
    first_in_stream = parse_carried_task(data.replace(b"task 5-0", b"task -"))
    assert first_in_stream is not None
    assert first_in_stream.previous_id is None


def test_parse_carried_task_rejects_malformed() -> None:
    message_id = str(uuid.uuid4()).encode()
    for data in [
        b"task 5-0 6-0",
        b"task 5-0 6-0 not-a-uuid {}",
        b"task x-0 6-0 " + message_id + b" {}",
        b"task 5-0 6-0 " + message_id + b" {broken",
        b"task 5-0 6-0 " + message_id + b" [1]",
    ]:
        assert parse_carried_task(data) is None, data
