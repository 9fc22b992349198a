"""Which presence events of a batch the dispatcher handles (select_events_to_handle)."""

from mensajero_common.models import DeviceStatus, MessageStatus
from mensajero_dispatcher.devices.service import (
    EVENT_OFFLINE,
    EVENT_ONLINE,
    select_events_to_handle,
)


async def test_select_events_keeps_online_device_with_pending_message(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    await factory.message(user)

    selected = await select_events_to_handle(ctx, [(device.id, EVENT_ONLINE)])

    assert selected == [(device.id, EVENT_ONLINE)]


async def test_select_events_keeps_user_with_assigned_task_elsewhere(ctx, factory):
    user = await factory.user()
    offline_device = await factory.device(user, status=DeviceStatus.OFFLINE)
    device = await factory.device(user)
    await factory.message(user, status=MessageStatus.ASSIGNED, device=offline_device)

    selected = await select_events_to_handle(ctx, [(device.id, EVENT_ONLINE)])

    assert selected == [(device.id, EVENT_ONLINE)]


async def test_select_events_drops_devices_without_work(ctx, factory):
    idle_user = await factory.user()
    idle = await factory.device(idle_user)
    await factory.message(idle_user, status=MessageStatus.DELIVERED, device=idle)
    busy_user = await factory.user()
    offline = await factory.device(busy_user, status=DeviceStatus.OFFLINE)
    disabled = await factory.device(busy_user, is_active=False)
    await factory.message(busy_user)

    selected = await select_events_to_handle(
        ctx,
        [
            (idle.id, EVENT_ONLINE),
            (offline.id, EVENT_ONLINE),
            (disabled.id, EVENT_ONLINE),
        ],
    )

    assert selected == []


async def test_select_events_handles_repeated_online_once(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    other = await factory.device(user)
    await factory.message(user)
    events = [
        (device.id, EVENT_ONLINE),
        (other.id, EVENT_OFFLINE),
        (device.id, EVENT_ONLINE),
        (other.id, EVENT_ONLINE),
        (device.id, "unknown"),
    ]

    selected = await select_events_to_handle(ctx, events)

    assert selected == [
        (device.id, EVENT_ONLINE),
        (other.id, EVENT_OFFLINE),
        (other.id, EVENT_ONLINE),
        (device.id, "unknown"),
    ]


async def test_select_events_passes_offline_events_through(ctx, factory):
    user = await factory.user()
    device = await factory.device(user)
    events = [(device.id, EVENT_OFFLINE)]

    assert await select_events_to_handle(ctx, events) == events
