"""Choosing among many online devices: the least-loaded query and the plan built on it."""

import json
import random
import uuid
from datetime import UTC, datetime

from mensajero_common.db import driver_connection
from mensajero_common.models import (
    AttemptStatus,
    DeviceStatus,
    MessageStatus,
    SMSMessageAttempt,
)
from mensajero_dispatcher.messages import repository
from mensajero_dispatcher.messages.schemas import (
    OnlineDevice,
    PendingMessage,
    RequestedDevice,
)
from mensajero_dispatcher.messages.service import (
    assign_due_retries,
    assign_messages,
    count_devices_needed,
    plan_assignments,
)

DEVICE_COUNT = 30


def _by_load(device: OnlineDevice) -> tuple[int, str]:
    return (device.in_flight, str(device.id))


async def _devices_with_loads(factory, user, loads: list[int]):
    """Create one online device per entry of `loads`, with that many messages in flight."""
    devices = []
    for index, load in enumerate(loads):
        device = await factory.device(user)
        for number in range(load):
            status = MessageStatus.ASSIGNED if number % 2 else MessageStatus.SENDING
            await factory.message(user, status=status, device=device)
        # Finished messages do not count towards the load.
        if index % 3 == 0:
            await factory.message(user, status=MessageStatus.DELIVERED, device=device)
        devices.append(device)
    return devices


async def test_least_loaded_query_ranks_and_cuts(factory, session_factory):
    user = await factory.user()
    other_user = await factory.user()
    loads = [(index * 7) % 4 + 1 for index in range(DEVICE_COUNT)]
    loads[5] = 0
    loads[17] = 0
    devices = await _devices_with_loads(factory, user, loads)
    await factory.device(user, status=DeviceStatus.OFFLINE)
    await factory.device(user, is_active=False)
    await factory.device(other_user)
    expected = sorted(
        (
            OnlineDevice(device.id, user.id, load)
            for device, load in zip(devices, loads, strict=True)
        ),
        key=_by_load,
    )

    async with session_factory() as session:
        three = await repository.find_least_loaded_devices(
            await driver_connection(session), {user.id: 3}
        )
        every = await repository.find_least_loaded_devices(
            await driver_connection(session), {user.id: None}
        )
        online = await repository.find_online_devices(
            await driver_connection(session), [user.id]
        )

    # Loads tie at 1 for the third place, so the lowest id of those devices takes it.
    assert sorted(three, key=_by_load) == expected[:3]
    assert {device.id for device in expected[:2]} == {devices[5].id, devices[17].id}
    assert sorted(every, key=_by_load) == expected
    assert sorted(online, key=_by_load) == expected


async def test_least_loaded_query_limits_each_user(factory, session_factory):
    first_user = await factory.user()
    second_user = await factory.user()
    first_devices = await _devices_with_loads(factory, first_user, [2, 0, 1])
    second_devices = await _devices_with_loads(factory, second_user, [1, 1, 0, 3])

    async with session_factory() as session:
        devices = await repository.find_least_loaded_devices(
            await driver_connection(session), {first_user.id: 1, second_user.id: None}
        )

    first = [device for device in devices if device.user_id == first_user.id]
    second = [device for device in devices if device.user_id == second_user.id]
    assert [(device.id, device.in_flight) for device in first] == [
        (first_devices[1].id, 0)
    ]
    assert {device.id for device in second} == {device.id for device in second_devices}
    assert sorted(device.in_flight for device in second) == [0, 1, 1, 3]


def _scans_of(plan: dict, table: str) -> list[dict]:
    """Return every node of an EXPLAIN (FORMAT JSON) plan that reads `table`."""
    found = [plan] if plan.get("Relation Name") == table else []
    for child in plan.get("Plans", []):
        found += _scans_of(child, table)
    return found


async def test_least_loaded_reads_messages_once(factory, session_factory):
    # A count per device read the messages once per online device, and scanned every open
    # message each time on some statistics. Whatever the plan, the count runs once.
    user = await factory.user()
    await _devices_with_loads(factory, user, [2, 0, 1, 3, 1, 0, 2, 1])

    async with session_factory() as session:
        connection = await driver_connection(session)
        plan_json = await connection.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + repository._LEAST_LOADED_DEVICES,
            [user.id],
            [None],
        )
    # The engine's connections decode json themselves; a bare asyncpg one returns text.
    if isinstance(plan_json, str):
        plan_json = json.loads(plan_json)
    plan = plan_json[0]["Plan"]

    scans = _scans_of(plan, "smsmessage")
    assert scans
    assert [scan["Actual Loops"] for scan in scans] == [1] * len(scans)


async def test_assign_picks_least_loaded_of_many(ctx, factory):
    user = await factory.user()
    loads = [2] * DEVICE_COUNT
    loads[11] = 1
    loads[23] = 0
    devices = await _devices_with_loads(factory, user, loads)
    messages = [await factory.message(user) for _ in range(3)]

    plan = await assign_messages(ctx, [message.id for message in messages])

    chosen = [item.device_id for item in plan.assignments]
    # The idle device comes first. Then it and the device with one message tie at 1,
    # and the lower id wins the tie.
    tied = sorted([devices[11].id, devices[23].id], key=str)
    assert chosen == [devices[23].id, *tied]
    stored = await factory.reload(messages[0])
    assert stored.device_id == devices[23].id


async def test_assign_batch_spreads_like_full_plan(ctx, factory, session_factory):
    user = await factory.user()
    loads = [(index * 5) % 3 for index in range(DEVICE_COUNT)]
    await _devices_with_loads(factory, user, loads)
    messages = [await factory.message(user) for _ in range(12)]
    async with session_factory() as session:
        online = await repository.find_online_devices(
            await driver_connection(session), [user.id]
        )
        pending = await repository.lock_pending_by_ids(
            session, [message.id for message in messages]
        )
    expected = plan_assignments(pending, online, {})

    plan = await assign_messages(ctx, [message.id for message in messages])

    assert [(item.message.id, item.device_id) for item in plan.assignments] == [
        (item.message.id, item.device_id) for item in expected.assignments
    ]


async def test_retry_skips_failed_least_loaded_device(ctx, factory, session_factory):
    user = await factory.user()
    loads = [1] * DEVICE_COUNT
    loads[4] = 0
    loads[9] = 0
    devices = await _devices_with_loads(factory, user, loads)
    failed, untried = sorted([devices[4], devices[9]], key=lambda item: str(item.id))
    message = await factory.message(user, attempts=1, next_attempt_at=datetime.now(UTC))
    async with session_factory() as session:
        session.add(
            SMSMessageAttempt(
                message_id=message.id,
                attempt_number=1,
                device_id=failed.id,
                status=AttemptStatus.FAILED,
                error="NO_SERVICE",
            )
        )
        await session.commit()

    assert await assign_due_retries(ctx) == 1

    stored = await factory.reload(message)
    assert stored.status == MessageStatus.ASSIGNED
    assert stored.device_id == untried.id
    assert stored.attempts == 2


def _random_case(rng: random.Random):
    users = [uuid.uuid4() for _ in range(rng.randint(1, 3))]
    online: list[OnlineDevice] = []
    requested: dict[uuid.UUID, RequestedDevice] = {}
    for user_id in users:
        for _ in range(rng.randint(0, 12)):
            device = OnlineDevice(uuid.uuid4(), user_id, rng.randint(0, 3))
            online.append(device)
            requested[device.id] = RequestedDevice(device.id, user_id, True)
        # Named devices that are offline or disabled are not in `online`.
        for is_active in (True, False):
            device_id = uuid.uuid4()
            requested[device_id] = RequestedDevice(device_id, user_id, is_active)

    messages = []
    for _ in range(rng.randint(1, 15)):
        user_id = rng.choice(users)
        own = [item.id for item in requested.values() if item.user_id == user_id]
        named = rng.choice(own) if rng.random() < 0.3 else None
        avoided = frozenset(rng.sample(own, k=min(len(own), rng.randint(0, 3))))
        messages.append(
            PendingMessage(
                id=uuid.uuid4(),
                user_id=user_id,
                requested_device_id=named,
                to_number="+34600000001",
                body="x",
                segments=1,
                encoding="gsm7",
                created_at=datetime.now(UTC),
                attempts=1 if avoided else 0,
                avoid_device_ids=avoided if named is None else frozenset(),
            )
        )
    return messages, online, requested


def test_plan_on_needed_devices_matches_full_plan():
    rng = random.Random(20261204)
    for _ in range(2000):
        messages, online, requested = _random_case(rng)
        needed = count_devices_needed(messages)
        least_loaded = [
            device
            for user_id, limit in needed.items()
            for device in sorted(
                (item for item in online if item.user_id == user_id), key=_by_load
            )[:limit]
        ]

        full = plan_assignments(messages, online, requested)
        cut = plan_assignments(messages, least_loaded, requested)

        assert cut == full


def test_count_devices_needed_counts_named_and_avoided():
    user_id = uuid.uuid4()
    named, avoided = uuid.uuid4(), uuid.uuid4()

    def message(**fields) -> PendingMessage:
        return PendingMessage(
            id=uuid.uuid4(),
            user_id=user_id,
            to_number="+34600000001",
            body="x",
            segments=1,
            encoding="gsm7",
            created_at=datetime.now(UTC),
            **{"requested_device_id": None, **fields},
        )

    only_named = [message(requested_device_id=named)]
    mixed = [
        message(requested_device_id=named),
        message(avoid_device_ids=frozenset({avoided, named})),
        message(),
    ]

    assert count_devices_needed(only_named) == {}
    assert count_devices_needed(mixed) == {user_id: 2 + 2}
