"""Sending one SMS to many recipients, and following its progress."""

import uuid
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Response, status

from mensajero_api.bulk import service
from mensajero_api.bulk.schemas import (
    BulkCancelResult,
    BulkProgress,
    BulkRejection,
    BulkSendRequest,
    BulkSendResult,
)
from mensajero_api.deps import (
    CurrentUser,
    KeysDep,
    LanguageDep,
    RedisDep,
    SessionDep,
    SettingsDep,
)
from mensajero_api.envelope import Envelope, error_responses
from mensajero_api.jsonbody import JSONBodyRoute
from mensajero_api.messages.routes import IdempotencyKey
from mensajero_common.i18n import translate
from mensajero_common.models import SMSBulkTask

router = APIRouter(prefix="/api/v1/sms", tags=["messages"], route_class=JSONBodyRoute)


def _rejections(task: SMSBulkTask, language: str) -> list[BulkRejection]:
    return [
        BulkRejection(**service.describe_rejection(item, language))
        for item in task.rejected
    ]


def _progress_fields(
    progress: service.BulkProgressCounts, language: str
) -> dict[str, Any]:
    task = progress.task
    return {
        "task_id": task.id,
        "status": "processing" if progress.in_flight else "completed",
        "total_recipients": task.total_recipients,
        "accepted": len(task.message_ids),
        "counts": progress.counts,
        "rejected": _rejections(task, language),
        "device_id": task.requested_device_id,
        "created_at": task.created_at,
    }


@router.post(
    "/send-bulk",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {
            "description": "A repeat of an earlier request with the same Idempotency-Key."
        },
        **error_responses(400, 401, 404, 409, 422, quota=True),
    },
)
async def send_bulk(
    data: BulkSendRequest,
    response: Response,
    background: BackgroundTasks,
    user: CurrentUser,
    session: SessionDep,
    redis: RedisDep,
    keys: KeysDep,
    settings: SettingsDep,
    language: LanguageDep,
    idempotency_key: IdempotencyKey = None,
) -> Envelope[BulkSendResult]:
    """Queue one SMS per recipient: 201 with the task and the new message ids.

    Send `{"recipients": [...], "body": "..."}` for one text to all, or
    `{"messages": [{"to": "...", "body": "..."}, ...]}` for a text each; `device_id` is
    optional in both. Invalid and repeated recipients are listed in `rejected` (index,
    number, reason, message) and not charged; the others are sent. Each message counts
    once against the monthly quota, and all of them are charged or none.

    Errors: 400 `too_many_recipients` (over BULK_MAX_RECIPIENTS), `no_valid_recipients`
    (with `rejected`), `empty_body`, `body_too_long`; 404 `device_not_found`; 409
    `device_inactive`, `idempotency_key_reused`; 429 `quota_exceeded` (its message says
    how many SMS still fit this month; nothing is created). A repeat with the same
    `Idempotency-Key` returns 200 with the first result and `Idempotent-Replayed: true`.
    """
    outcome = await service.send_bulk(session, settings, user, data, idempotency_key)
    task = outcome.task
    if outcome.created:
        # After the response: the messages are committed, so the sender need not wait
        # for Redis, and if the signal is lost the dispatcher's sweep finds them.
        background.add_task(service.signal_dispatcher, redis, keys, task)
        confirmation = translate(
            "bulk_queued",
            language,
            accepted=len(task.message_ids),
            rejected=len(task.rejected),
        )
    else:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
        confirmation = translate("bulk_replayed", language)

    result = BulkSendResult(
        task_id=task.id,
        total_recipients=task.total_recipients,
        accepted=len(task.message_ids),
        status="processing",
        message_ids=task.message_ids,
        rejected=_rejections(task, language),
    )
    return Envelope(data=result, message=confirmation)


@router.get("/bulk/{task_id}", responses=error_responses(401, 404, 422))
async def read_bulk_progress(
    task_id: uuid.UUID, user: CurrentUser, session: SessionDep, language: LanguageDep
) -> Envelope[BulkProgress]:
    """Count the messages of a bulk send by status; another user's task is a 404."""
    progress = await service.get_progress(session, user, task_id)
    return Envelope(data=BulkProgress(**_progress_fields(progress, language)))


@router.post("/bulk/{task_id}/cancel", responses=error_responses(401, 404, 422))
async def cancel_bulk(
    task_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    redis: RedisDep,
    keys: KeysDep,
    settings: SettingsDep,
    language: LanguageDep,
) -> Envelope[BulkCancelResult]:
    """Cancel every message of a bulk send that no phone has started sending: 200 with
    the task as GET /api/v1/sms/bulk/{task_id} returns it, and `cancelled`.

    Each message is cancelled as by POST /api/v1/sms/messages/{message_id}/cancel.
    Messages that a phone has claimed, and those that have ended, are left as they are.
    Repeating the request returns 200 with `cancelled: 0` once nothing is left to
    cancel. Errors: 404 `bulk_task_not_found` (also for another user's task).
    """
    outcome = await service.cancel_bulk(session, redis, keys, settings, user, task_id)
    result = BulkCancelResult(
        **_progress_fields(outcome.progress, language), cancelled=outcome.cancelled
    )
    confirmation = translate("bulk_cancelled", language, cancelled=outcome.cancelled)
    return Envelope(data=result, message=confirmation)
