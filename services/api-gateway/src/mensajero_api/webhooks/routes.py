"""Webhooks of the current user: CRUD, a test POST, and the delivery log."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from mensajero_api.deps import CurrentUser, LanguageDep, SessionDep, SettingsDep
from mensajero_api.envelope import Envelope, error_responses
from mensajero_api.jsonbody import JSONBodyRoute
from mensajero_api.webhooks import service
from mensajero_api.webhooks.schemas import (
    DeliveryList,
    DeliveryListQuery,
    WebhookCreate,
    WebhookDeleted,
    WebhookList,
    WebhookListQuery,
    WebhookPublic,
    WebhookTestResult,
    WebhookUpdate,
    WebhookWithSecret,
)
from mensajero_common.i18n import translate
from mensajero_common.webhook_transport import create_webhook_client

router = APIRouter(
    prefix="/api/v1/sms/webhooks", tags=["webhooks"], route_class=JSONBodyRoute
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(400, 401, 409, 422),
)
async def create_webhook(
    data: WebhookCreate,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    language: LanguageDep,
) -> Envelope[WebhookWithSecret]:
    """Create a webhook. Without `secret_key`, one is generated and shown only here.

    Events: `sms_received`, `sms_sent`, `sms_delivered`, `sms_failed`. Every POST is
    signed; see the README for how to verify it.
    """
    webhook, generated = await service.create_webhook(session, settings, user, data)
    public = WebhookPublic.model_validate(webhook)
    message_key = "webhook_created_with_secret" if generated else "webhook_created"
    return Envelope(
        data=WebhookWithSecret(**public.model_dump(), secret_key=generated),
        message=translate(message_key, language),
    )


@router.get("", responses=error_responses(400, 401, 422))
async def list_webhooks(
    user: CurrentUser,
    session: SessionDep,
    query: Annotated[WebhookListQuery, Query()],
) -> Envelope[WebhookList]:
    """List the user's webhooks, newest first unless `order=asc`, by keyset pagination.

    One page of up to `limit` webhooks (default 50, at most 100). Pass `next_cursor` as
    `cursor` for the next page, with the same `order`, until it is null. `is_active`
    and `event` (the webhooks subscribed to that event) narrow the listing. A cursor
    that this listing did not return, or one made for the other `order`, gets 400
    `invalid_cursor`, and an unknown query parameter gets 422.
    """
    webhooks, next_cursor = await service.list_webhooks(session, user, query)
    return Envelope(
        data=WebhookList(
            items=[WebhookPublic.model_validate(w) for w in webhooks],
            next_cursor=next_cursor,
            limit=query.limit,
        )
    )


@router.get("/{webhook_id}", responses=error_responses(401, 404, 422))
async def read_webhook(
    webhook_id: uuid.UUID, user: CurrentUser, session: SessionDep
) -> Envelope[WebhookPublic]:
    webhook = await service.get_webhook(session, user, webhook_id)
    return Envelope(data=WebhookPublic.model_validate(webhook))


@router.put("/{webhook_id}", responses=error_responses(400, 401, 404, 422))
async def update_webhook(
    webhook_id: uuid.UUID,
    data: WebhookUpdate,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    language: LanguageDep,
) -> Envelope[WebhookPublic]:
    """Change the URL, secret, events or active flag; fields left out keep their values.

    Setting `is_active` to true also clears `disabled_reason` and `disabled_at`.
    """
    webhook = await service.update_webhook(session, settings, user, webhook_id, data)
    return Envelope(
        data=WebhookPublic.model_validate(webhook),
        message=translate("webhook_updated", language),
    )


@router.delete("/{webhook_id}", responses=error_responses(401, 404, 422))
async def delete_webhook(
    webhook_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    language: LanguageDep,
) -> Envelope[WebhookDeleted]:
    await service.delete_webhook(session, user, webhook_id)
    return Envelope(
        data=WebhookDeleted(webhook_id=webhook_id),
        message=translate("webhook_deleted", language),
    )


@router.post("/{webhook_id}/test", responses=error_responses(401, 404, 422))
async def test_webhook(
    webhook_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    language: LanguageDep,
) -> Envelope[WebhookTestResult]:
    """POST a signed `webhook_test` event now and return the endpoint's response.

    This endpoint returns 200 whatever the webhook endpoint did: `success`, `status_code`,
    `duration_ms`, and `error` when no response came. The test also appears in the log.
    """
    async with create_webhook_client(
        allow_private=settings.webhook_private_urls_allowed
    ) as http:
        outcome = await service.send_test_event(
            session, settings, http, user, webhook_id
        )
    result = outcome.result
    message_key = (
        "webhook_test_succeeded" if result.succeeded else "webhook_test_failed"
    )
    return Envelope(
        data=WebhookTestResult(
            success=result.succeeded,
            status_code=result.status_code,
            duration_ms=result.duration_ms,
            error=result.error,
            event_id=outcome.event_id,
        ),
        message=translate(message_key, language),
    )


@router.get("/{webhook_id}/deliveries", responses=error_responses(400, 401, 404, 422))
async def list_deliveries(
    webhook_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    query: Annotated[DeliveryListQuery, Query()],
) -> Envelope[DeliveryList]:
    """List the delivery log, newest first: each event with every attempt made for it."""
    deliveries = await service.list_deliveries(
        session, user, webhook_id, limit=query.limit, cursor=query.cursor
    )
    return Envelope(data=deliveries)
