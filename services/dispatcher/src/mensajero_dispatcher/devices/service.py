"""Reactions to device presence: assigning waiting messages, and marking silent devices
offline."""

import uuid
from collections.abc import Sequence

import structlog

from mensajero_common import queues
from mensajero_common.db import session_scope
from mensajero_common.models import SMSDevice
from mensajero_dispatcher.attempts.service import (
    SILENT_PING_INTERVALS,
    move_unacknowledged_tasks,
)
from mensajero_dispatcher.context import DispatcherContext
from mensajero_dispatcher.devices import repository
from mensajero_dispatcher.messages.service import assign_pending_for_device

log = structlog.get_logger(__name__)

EVENT_ONLINE = "online"
EVENT_OFFLINE = "offline"


async def handle_device_event(
    ctx: DispatcherContext, device_id: uuid.UUID, event: str
) -> None:
    """Apply one presence event that the device-hub signalled."""
    if event == EVENT_ONLINE:
        assigned = await assign_pending_for_device(ctx, device_id)
        # Tasks left unacknowledged on the user's other devices (offline ones, say) may
        # move to this one now instead of at the next periodic check.
        moved = 0
        async with ctx.session_factory() as session:
            device = await session.get(SMSDevice, device_id)
        if device is not None:
            moved = await move_unacknowledged_tasks(ctx, device.user_id)
        log.debug(
            "device online handled",
            device_id=str(device_id),
            assigned=assigned,
            moved=moved,
        )
        return
    if event == EVENT_OFFLINE:
        # Tasks of an offline device wait in its stream until it returns, or until
        # TASK_ACK_TIMEOUT_S passes and the periodic check moves them to another device.
        return
    log.warning("unknown device event ignored", device_id=str(device_id), event=event)


async def select_events_to_handle(
    ctx: DispatcherContext, events: Sequence[tuple[uuid.UUID, str]]
) -> list[tuple[uuid.UUID, str]]:
    """Return the (device id, event) pairs of a batch that may change anything, in
    their order.

    An online event assigns its user's pending messages and moves the user's
    unacknowledged tasks, which takes several round trips. When the device is no longer
    online and active, or its user has no message pending or assigned, both find
    nothing. So such an event is dropped after one query for the whole batch, which
    keeps the reconnection of thousands of idle phones cheap. A device's repeated
    online events in one batch are handled once.
    """
    online_ids = {device_id for device_id, event in events if event == EVENT_ONLINE}
    if not online_ids:
        return list(events)
    async with ctx.session_factory() as session:
        with_work = await repository.find_online_devices_with_waiting_messages(
            session, online_ids
        )

    selected: list[tuple[uuid.UUID, str]] = []
    for device_id, event in events:
        if event == EVENT_ONLINE:
            if device_id not in with_work:
                continue
            # Only the first online event of the device in this batch is kept.
            with_work.discard(device_id)
        selected.append((device_id, event))
    return selected


async def cleanup_offline_devices(ctx: DispatcherContext) -> int:
    """Mark offline every device still `online` without a heartbeat for
    WEBSOCKET_HEARTBEAT_TIMEOUT seconds, or SILENT_PING_INTERVALS ping intervals if that
    is longer, and return how many changed.

    A device-hub that dies cannot mark its devices offline itself, so without this they
    would stay online and keep receiving assignments they cannot send. The heartbeat of
    a live connection can be two and a half ping intervals old, so a heartbeat timeout
    shorter than that does not mark it offline.
    """
    settings = ctx.settings
    silent_for_s = max(
        settings.WEBSOCKET_HEARTBEAT_TIMEOUT,
        SILENT_PING_INTERVALS * settings.WEBSOCKET_PING_INTERVAL,
    )
    async with session_scope(ctx.session_factory) as session:
        changed = await repository.mark_silent_devices_offline(
            session, silent_for_s=silent_for_s
        )

    for device_id, user_id in changed:
        log.info(
            "device marked offline: heartbeat timed out",
            device_id=str(device_id),
            user_id=str(user_id),
        )
        await queues.signal_device_event(ctx.redis, ctx.keys, device_id, EVENT_OFFLINE)
    return len(changed)
