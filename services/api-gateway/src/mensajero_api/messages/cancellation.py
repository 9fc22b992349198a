"""Cancelling outgoing messages that no phone has claimed.

A cancel ends the message `failed` with the error `cancelled`, gives its quota charge
back and records `sms_failed`, with the rules of mensajero_common.message_attempts, and
commits. Only then do its task entries leave the device streams and its webhook
deliveries get queued. The single cancel and the bulk cancel share this module.
"""

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import structlog
from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.messages.service import MessageNotFoundError, get_message
from mensajero_common import message_attempts, queues
from mensajero_common.errors import ConflictError
from mensajero_common.keys import RedisKeys
from mensajero_common.message_attempts import ERROR_CANCELLED, LockedMessage
from mensajero_common.models import MessageStatus, MessageType, SMSMessage, User
from mensajero_common.settings import Settings
from mensajero_common.webhook_outbox import queue_deliveries

logger = structlog.get_logger(__name__)


class MessageNotCancellableError(ConflictError):
    """A phone has claimed the message, or it has ended, or it is an incoming one."""

    code = "message_not_cancellable"

    def __init__(self, message_id: uuid.UUID, status: MessageStatus) -> None:
        super().__init__(
            message_id=str(message_id),
            status=status.value,
            details={"message_id": str(message_id), "status": status.value},
        )


@dataclass
class Cancellation:
    """Messages cancelled in a transaction, and the work left for after its commit."""

    message_ids: list[uuid.UUID] = field(default_factory=list)
    # (device id, message id, attempt) of each cancelled task that a device stream may
    # still hold.
    tasks: list[tuple[uuid.UUID, uuid.UUID, int]] = field(default_factory=list)
    # Webhook deliveries of the `sms_failed` events.
    delivery_ids: list[uuid.UUID] = field(default_factory=list)


async def cancel_locked(
    session: AsyncSession,
    settings: Settings,
    messages: Iterable[LockedMessage],
    cancellation: Cancellation,
) -> None:
    """End each message that no phone has claimed `failed` with the error `cancelled`,
    and add it to `cancellation`; leave the others as they are.

    The messages must be locked in this transaction, in id order as
    message_attempts.lock_messages locks them, the order of the device-hub's report
    batches. So a phone's claim (`sending`) of one of them is applied either before the
    cancel, which then leaves the message alone, or after it, and then its `ack` names
    `failed` and the phone does not send.
    """
    for message in messages:
        end = await message_attempts.cancel_message(session, settings, message)
        if end is None:
            continue
        cancellation.message_ids.append(message.id)
        cancellation.delivery_ids += end.delivery_ids
        if message.status is MessageStatus.ASSIGNED and message.device_id is not None:
            cancellation.tasks.append(
                (message.device_id, message.id, message.current_attempt)
            )


async def finish_cancellation(
    redis: Redis, keys: RedisKeys, cancellation: Cancellation
) -> None:
    """Remove the committed cancellation's tasks from their device streams and queue its
    webhook deliveries.

    A Redis failure is logged and not raised. A task left in a stream is dropped by the
    hub when it reads it, or the phone's claim of it gets an `ack` naming `failed`. The
    webhook-sender's sweep sends the deliveries later.
    """
    try:
        await queues.remove_device_tasks(redis, keys, cancellation.tasks)
    except RedisError:
        logger.exception(
            "removing cancelled tasks from device streams failed",
            count=len(cancellation.tasks),
        )
    if not cancellation.delivery_ids:
        return
    try:
        # create_redis opens an ArqRedis, which can enqueue jobs.
        await queue_deliveries(cast(ArqRedis, redis), keys, cancellation.delivery_ids)
    except RedisError:
        logger.exception(
            "queueing webhook deliveries failed", count=len(cancellation.delivery_ids)
        )


def is_cancelled(message: SMSMessage) -> bool:
    return message.status == MessageStatus.FAILED and message.error == ERROR_CANCELLED


async def cancel_message(
    session: AsyncSession,
    redis: Redis,
    keys: RedisKeys,
    settings: Settings,
    user: User,
    message_id: uuid.UUID,
) -> SMSMessage:
    """Cancel a `pending` or `assigned` message of the user, commit, and return it.

    Its quota charge is given back and `sms_failed` is recorded with the error
    `cancelled`. A message that is already cancelled is returned unchanged. Raises
    MessageNotFoundError as get_message does, and MessageNotCancellableError for a
    message in any other status.
    """
    message = await get_message(session, user, message_id)
    if message.type != MessageType.OUTGOING:
        raise MessageNotCancellableError(message.id, MessageStatus(message.status))
    locked = await message_attempts.lock_message(session, message.id)
    if locked is None:
        raise MessageNotFoundError(message_id)

    cancellation = Cancellation()
    await cancel_locked(session, settings, [locked], cancellation)
    # Read again under the lock: the row may have changed since get_message read it.
    await session.refresh(message)
    if not cancellation.message_ids and not is_cancelled(message):
        raise MessageNotCancellableError(message.id, MessageStatus(message.status))
    await session.commit()
    if not cancellation.message_ids:
        return message

    await finish_cancellation(redis, keys, cancellation)
    logger.info(
        "message cancelled",
        user_id=str(message.user_id),
        message_id=str(message.id),
        device_id=str(message.device_id) if message.device_id else None,
        status_before=locked.status.value,
    )
    return message
