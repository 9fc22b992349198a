"""Sending SMS and reading sent and received messages."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from mensajero_api.deps import (
    CurrentUser,
    LanguageDep,
    ResourcesDep,
    SessionDep,
)
from mensajero_api.envelope import Envelope, error_responses
from mensajero_api.jsonbody import JSONBodyRoute
from mensajero_api.messages import cancellation, service
from mensajero_api.messages.schemas import (
    IncomingListQuery,
    MessageListQuery,
    MessagePage,
    MessagePublic,
    SendRequest,
    SendResult,
)
from mensajero_common.i18n import translate
from mensajero_common.models import MessageType, SMSMessage

router = APIRouter(prefix="/api/v1/sms", tags=["messages"], route_class=JSONBodyRoute)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description=(
            "Any unique string (a UUID, say). A repeat of the same request with the same "
            "key returns the first result instead of sending again. A key is scoped to "
            "the user and the endpoint: the same key on /send and /send-bulk makes two "
            "separate sends."
        ),
    ),
]
ListQuery = Annotated[MessageListQuery, Query()]
IncomingQuery = Annotated[IncomingListQuery, Query()]


def _page(rows: list[SMSMessage], next_cursor: str | None, limit: int) -> MessagePage:
    return MessagePage(
        items=[MessagePublic.from_model(row) for row in rows],
        next_cursor=next_cursor,
        limit=limit,
    )


@router.post(
    "/send",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {
            "description": "A repeat of an earlier request with the same Idempotency-Key."
        },
        **error_responses(400, 401, 404, 409, 422, quota=True),
    },
)
async def send_sms(
    data: SendRequest,
    response: Response,
    user: CurrentUser,
    session: SessionDep,
    # One dependency gives Redis, the keys and the settings, because each dependency
    # costs every send some CPU.
    resources: ResourcesDep,
    language: LanguageDep,
    idempotency_key: IdempotencyKey = None,
) -> Envelope[SendResult]:
    """Queue one SMS: 201 with the new message, `pending` until a device takes it.

    Errors: 400 `invalid_phone_number`, `empty_body`, `body_too_long`; 404
    `device_not_found`; 409 `device_inactive`, `idempotency_key_reused`; 429
    `quota_exceeded` (monthly SMS). A repeat with the same `Idempotency-Key` returns 200
    with the first message and its current status, and header `Idempotent-Replayed: true`.
    """
    outcome = await service.send_message(
        session,
        resources.redis,
        resources.keys,
        resources.settings,
        user,
        data,
        idempotency_key,
    )
    message = outcome.message
    if outcome.created:
        confirmation = translate("message_queued", language)
    else:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
        confirmation = translate("message_replayed", language)

    result = SendResult(
        message_id=message.id,
        status=message.status,
        to=message.to_number or "",
        segments=message.segments,
        encoding=message.encoding,
    )
    return Envelope(data=result, message=confirmation)


@router.get("/messages", responses=error_responses(400, 401, 404, 422))
async def list_messages(
    query: ListQuery, user: CurrentUser, session: SessionDep
) -> Envelope[MessagePage]:
    """List the user's messages, newest first unless `order=asc`, by keyset pagination.

    Follow `next_cursor` until it is null. Rows inserted between two page requests never
    make a page repeat or skip a row that existed when the first page was read. A
    `device_id` that is not one of the user's devices gets 404 `device_not_found`.
    """
    rows, next_cursor = await service.list_messages(session, user, query)
    return Envelope(data=_page(rows, next_cursor, query.limit))


@router.get("/messages/{message_id}", responses=error_responses(401, 404, 422))
async def read_message(
    message_id: uuid.UUID, user: CurrentUser, session: SessionDep
) -> Envelope[MessagePublic]:
    """Read one message; the id may be in any letter case."""
    message = await service.get_message(session, user, message_id)
    return Envelope(data=MessagePublic.from_model(message))


@router.post(
    "/messages/{message_id}/cancel", responses=error_responses(401, 404, 409, 422)
)
async def cancel_message(
    message_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    resources: ResourcesDep,
    language: LanguageDep,
) -> Envelope[MessagePublic]:
    """Cancel a message that no phone has started sending: 200 with the message as GET
    returns it, now `failed` with the error `cancelled`.

    A `pending` message can be cancelled, and an `assigned` one until its phone claims it
    (reports `sending`). A phone that claims it afterwards gets an `ack` naming `failed`
    and does not send it. The SMS goes back to the monthly quota, unless it was charged
    before the latest monthly reset, and `sms_failed` is sent with the error `cancelled`.
    Cancelling it again returns 200 and changes nothing.

    Errors: 404 `message_not_found` (also for another user's message); 409
    `message_not_cancellable`, with the message's `status`, for any other message.
    """
    message = await cancellation.cancel_message(
        session,
        resources.redis,
        resources.keys,
        resources.settings,
        user,
        message_id,
    )
    return Envelope(
        data=MessagePublic.from_model(message),
        message=translate("message_cancelled", language),
    )


@router.get("/incoming", responses=error_responses(400, 401, 404, 422))
async def list_incoming(
    query: IncomingQuery, user: CurrentUser, session: SessionDep
) -> Envelope[MessagePage]:
    """List received SMS: the message listing with `type` fixed to incoming.

    A `type` other than `incoming` gets 422 with an item of type `incoming_listing_type`.
    """
    rows, next_cursor = await service.list_messages(
        session, user, query, message_type=MessageType.INCOMING
    )
    return Envelope(data=_page(rows, next_cursor, query.limit))
