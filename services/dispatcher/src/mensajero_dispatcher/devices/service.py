"""Reactions to device presence: assigning waiting messages, and marking silent devices
offline."""

import uuid

import structlog

from mensajero_common import queues
from mensajero_common.db import session_scope
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
        log.debug("device online handled", device_id=str(device_id), assigned=assigned)
        return
    if event == EVENT_OFFLINE:
        # Tasks of an offline device wait in its stream until it returns.
        return
    log.warning("unknown device event ignored", device_id=str(device_id), event=event)


async def cleanup_offline_devices(ctx: DispatcherContext) -> int:
    """Mark offline every device still `online` without a heartbeat for
    WEBSOCKET_HEARTBEAT_TIMEOUT seconds, and return how many changed.

    A device-hub that dies cannot mark its devices offline itself, so without this they
    would stay online and keep receiving assignments they cannot send.
    """
    async with session_scope(ctx.session_factory) as session:
        changed = await repository.mark_silent_devices_offline(
            session, silent_for_s=ctx.settings.WEBSOCKET_HEARTBEAT_TIMEOUT
        )

    for device_id, user_id in changed:
        log.info(
            "device marked offline: heartbeat timed out",
            device_id=str(device_id),
            user_id=str(user_id),
        )
        await queues.signal_device_event(ctx.redis, ctx.keys, device_id, EVENT_OFFLINE)
    return len(changed)
