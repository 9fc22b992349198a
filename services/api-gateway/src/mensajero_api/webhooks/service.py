"""Creating, changing, testing and deleting webhooks, and reading their delivery log.

A webhook URL is checked when it is saved and again before every POST, because DNS can
change in between. In production only https URLs that resolve to public addresses pass.
"""

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.pagination import (
    Cursor,
    Listing,
    decode_cursor,
    encode_cursor,
    split_page,
)
from mensajero_api.users import repository as users_repository
from mensajero_api.webhooks import repository
from mensajero_api.webhooks.schemas import (
    AttemptPublic,
    DeliveryList,
    DeliveryPublic,
    WebhookCreate,
    WebhookListQuery,
    WebhookUpdate,
)
from mensajero_common.errors import ConflictError, NotFoundError, ValidationFailedError
from mensajero_common.models import (
    User,
    WebhookAttempt,
    WebhookConfig,
    WebhookDelivery,
    WebhookDeliveryStatus,
    WebhookEvent,
)
from mensajero_common.settings import Settings
from mensajero_common.text import is_blank, is_invisible
from mensajero_common.webhook_outbox import build_event_body
from mensajero_common.webhooks import (
    EVENTS,
    SECRET_PREFIX,
    AttemptResult,
    UnsafeWebhookURLError,
    check_url_target,
    generate_secret,
    post_event,
)

logger = structlog.get_logger(__name__)

# Webhooks a user may have at once; each event is POSTed to every one of them.
MAX_WEBHOOKS_PER_USER = 20
MIN_SECRET_LENGTH = 16
# The width of webhookconfig.secret_key.
MAX_SECRET_LENGTH = 255
# Control characters (general category Cc). A secret with NUL never reaches the check,
# because the request schema rejects it with 422 `string_contains_nul`.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
TEST_EVENT = "webhook_test"


class WebhookNotFoundError(NotFoundError):
    """The webhook does not exist or belongs to another user (404, so ids don't leak)."""

    code = "webhook_not_found"

    def __init__(self, webhook_id: uuid.UUID) -> None:
        super().__init__(
            webhook_id=str(webhook_id), details={"webhook_id": str(webhook_id)}
        )


class InvalidWebhookURLError(ValidationFailedError):
    code = "invalid_webhook_url"

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url=url, reason=reason, details={"url": url, "reason": reason})


class UnknownWebhookEventError(ValidationFailedError):
    code = "unknown_webhook_event"

    def __init__(self, unknown: list[str]) -> None:
        super().__init__(
            events=", ".join(unknown),
            allowed=", ".join(EVENTS),
            details={"unknown_events": unknown, "allowed_events": list(EVENTS)},
        )


class WebhookLimitError(ConflictError):
    code = "webhook_limit_reached"

    def __init__(self) -> None:
        super().__init__(
            limit=MAX_WEBHOOKS_PER_USER, details={"limit": MAX_WEBHOOKS_PER_USER}
        )


class InvalidWebhookSecretError(ValidationFailedError):
    code = "invalid_webhook_secret"

    def __init__(self, reason: str) -> None:
        super().__init__(
            reason=reason,
            min_length=MIN_SECRET_LENGTH,
            max_length=MAX_SECRET_LENGTH,
            details={"reason": reason},
        )


def _check_secret(secret: str) -> None:
    """Reject a blank secret, one with control characters or surrounding whitespace, one
    too short to resist guessing, or a malformed `whsec_` secret.

    The receiver must hold the exact same text to verify the signatures. A tab, a line
    break or a space at either end is easily lost when the secret is copied into a
    configuration file or an environment variable, and the signatures then fail to
    verify. A `whsec_` secret must carry base64 after the prefix, because Standard
    Webhooks verifiers decode it to get the HMAC key. With anything else there, those
    libraries could never verify the requests.
    """
    if is_blank(secret):
        raise InvalidWebhookSecretError("blank")
    if _CONTROL_CHARACTER.search(secret):
        raise InvalidWebhookSecretError("control_character")
    # An invisible character at either end (U+200B, say) is kept by str.strip() and as
    # easily lost as a space.
    if secret != secret.strip() or is_invisible(secret[0]) or is_invisible(secret[-1]):
        raise InvalidWebhookSecretError("surrounding_whitespace")
    if not MIN_SECRET_LENGTH <= len(secret) <= MAX_SECRET_LENGTH:
        raise InvalidWebhookSecretError("length")
    if not secret.startswith(SECRET_PREFIX):
        return
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidWebhookSecretError("whsec_not_base64") from None
    if not key:
        raise InvalidWebhookSecretError("whsec_not_base64")


def _check_events(events: list[str]) -> list[str]:
    unknown = [event for event in events if event not in EVENTS]
    if unknown:
        raise UnknownWebhookEventError(unknown)
    # Keep the order the user gave, without repeats.
    return list(dict.fromkeys(events))


async def _check_url(settings: Settings, url: str) -> None:
    try:
        await check_url_target(
            url,
            require_https=settings.is_production,
            allow_private=settings.webhook_private_urls_allowed,
        )
    except UnsafeWebhookURLError as error:
        raise InvalidWebhookURLError(url, error.reason) from None


async def get_webhook(
    session: AsyncSession,
    user: User,
    webhook_id: uuid.UUID,
    *,
    for_update: bool = False,
) -> WebhookConfig:
    webhook = await repository.get_webhook(
        session, user.id, webhook_id, for_update=for_update
    )
    if webhook is None:
        raise WebhookNotFoundError(webhook_id)
    return webhook


async def list_webhooks(
    session: AsyncSession, user: User, query: WebhookListQuery
) -> tuple[list[WebhookConfig], str | None]:
    """Return one page of the user's webhooks and the cursor of the next page, if any.

    A cursor only positions the walk: the query is always scoped to `user`, so a cursor
    taken from another user's listing returns this user's rows after that position.
    """
    after = (
        decode_cursor(query.cursor, query.order, Listing.WEBHOOKS)
        if query.cursor
        else None
    )
    filters = repository.WebhookFilters(is_active=query.is_active, event=query.event)
    rows = await repository.list_webhooks(
        session,
        user.id,
        filters,
        after=after,
        descending=query.order == "desc",
        limit=query.limit + 1,
    )
    return split_page(rows, query.limit, query.order, Listing.WEBHOOKS)


async def create_webhook(
    session: AsyncSession, settings: Settings, user: User, data: WebhookCreate
) -> tuple[WebhookConfig, str | None]:
    """Create a webhook; commit. Returns it and the secret when the server generated one."""
    events = _check_events(data.events)
    if data.secret_key is not None:
        _check_secret(data.secret_key)
    await _check_url(settings, data.url)
    # Without the lock, parallel creates would each count the same rows and insert past
    # the limit. The lock is taken after the URL check, which may wait on DNS.
    await users_repository.lock_user(session, user.id)
    if await repository.count_webhooks(session, user.id) >= MAX_WEBHOOKS_PER_USER:
        await session.rollback()
        raise WebhookLimitError()

    generated = generate_secret() if data.secret_key is None else None
    webhook = WebhookConfig(
        user_id=user.id,
        url=data.url,
        secret_key=data.secret_key or generated,
        events=events,
        is_active=data.is_active,
    )
    session.add(webhook)
    await session.commit()
    logger.info("webhook created", webhook_id=str(webhook.id), user_id=str(user.id))
    return webhook, generated


async def update_webhook(
    session: AsyncSession,
    settings: Settings,
    user: User,
    webhook_id: uuid.UUID,
    data: WebhookUpdate,
) -> WebhookConfig:
    await get_webhook(session, user, webhook_id)
    changes = data.model_dump(exclude_unset=True)
    if changes.get("events") is not None:
        changes["events"] = _check_events(changes["events"])
    if changes.get("url") is not None:
        await _check_url(settings, changes["url"])
    if changes.get("secret_key") is not None:
        _check_secret(changes["secret_key"])

    # Read again with the row locked, after the URL check, which may wait on DNS: a
    # delete that committed meanwhile gives 404 here instead of an UPDATE of no row.
    webhook = await get_webhook(session, user, webhook_id, for_update=True)
    for field, value in changes.items():
        if value is not None:
            setattr(webhook, field, value)
    if changes.get("is_active") is True:
        # Both fields describe the deactivation that the owner has just undone.
        webhook.disabled_reason = None
        webhook.disabled_at = None
    webhook.updated_at = datetime.now(UTC)
    await session.commit()
    logger.info(
        "webhook updated",
        webhook_id=str(webhook.id),
        user_id=str(user.id),
        fields=sorted(changes),
    )
    return webhook


async def delete_webhook(
    session: AsyncSession, user: User, webhook_id: uuid.UUID
) -> None:
    """Delete the webhook with its delivery log; its pending deliveries are dropped."""
    if not await repository.delete_webhook(session, user.id, webhook_id):
        raise WebhookNotFoundError(webhook_id)
    await session.commit()
    logger.info("webhook deleted", webhook_id=str(webhook_id), user_id=str(user.id))


@dataclass(frozen=True)
class TestOutcome:
    event_id: uuid.UUID
    result: AttemptResult


async def send_test_event(
    session: AsyncSession,
    settings: Settings,
    http: httpx.AsyncClient,
    user: User,
    webhook_id: uuid.UUID,
) -> TestOutcome:
    """POST a signed `webhook_test` event now, and log it like any other delivery.

    The session's transaction ends before the POST, so that a slow endpoint keeps no
    Postgres connection busy. Raises WebhookNotFoundError when the webhook is deleted
    meanwhile.
    """
    webhook = await get_webhook(session, user, webhook_id)
    await session.commit()
    event_id = uuid.uuid4()
    # The rows are inserted after the POST, so the database's now() would date them
    # after the attempt. They are dated when the event was made, before the attempt.
    created_at = datetime.now(UTC)
    body = build_event_body(
        event=TEST_EVENT,
        event_id=event_id,
        message_id=None,
        from_number=None,
        to_number=None,
        body="Mensajero webhook test",
        timestamp=created_at,
        device_id=None,
    )
    result = await post_event(
        http,
        url=webhook.url,
        secret=webhook.secret_key,
        event_id=str(event_id),
        body=body,
        timeout_s=settings.WEBHOOK_TIMEOUT_S,
        require_https=settings.is_production,
        allow_private=settings.webhook_private_urls_allowed,
    )

    status = (
        WebhookDeliveryStatus.SUCCEEDED
        if result.succeeded
        else WebhookDeliveryStatus.FAILED
    )
    started_at = datetime.fromtimestamp(result.started_at, UTC)
    event = WebhookEvent(
        id=event_id,
        user_id=user.id,
        event=TEST_EVENT,
        body=body.decode(),
        created_at=created_at,
    )
    delivery = WebhookDelivery(
        event_id=event_id,
        webhook_id=webhook.id,
        user_id=user.id,
        status=status,
        attempts=1,
        last_status_code=result.status_code,
        last_error=result.error,
        created_at=created_at,
        # The end of the attempt, so never before its start.
        completed_at=started_at + timedelta(milliseconds=result.duration_ms),
    )
    session.add(event)
    await session.flush()
    session.add(delivery)
    try:
        await session.flush()
    except IntegrityError:
        # The webhook was deleted while the event was on its way.
        await session.rollback()
        raise WebhookNotFoundError(webhook_id) from None
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id,
            attempt_number=1,
            started_at=started_at,
            duration_ms=result.duration_ms,
            status_code=result.status_code,
            error=result.error,
        )
    )
    await session.commit()
    logger.info(
        "webhook test sent",
        webhook_id=str(webhook.id),
        status_code=result.status_code,
        error=result.error,
    )
    return TestOutcome(event_id=event_id, result=result)


async def list_deliveries(
    session: AsyncSession,
    user: User,
    webhook_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None,
) -> DeliveryList:
    """Return the webhook's deliveries, newest first, each with all its attempts."""
    await get_webhook(session, user, webhook_id)
    before = (
        decode_cursor(cursor, "desc", Listing.WEBHOOK_DELIVERIES) if cursor else None
    )
    rows = await repository.list_deliveries(
        session, webhook_id, limit=limit, before=before
    )
    attempts = await repository.attempts_of(
        session, [delivery.id for delivery, _ in rows]
    )

    items = [
        DeliveryPublic(
            id=delivery.id,
            event_id=event.id,
            event=event.event,
            message_id=event.message_id,
            status=delivery.status,
            attempts=[
                AttemptPublic.model_validate(a) for a in attempts.get(delivery.id, [])
            ],
            next_attempt_at=(
                delivery.next_attempt_at
                if delivery.status == WebhookDeliveryStatus.PENDING
                else None
            ),
            last_error=delivery.last_error,
            created_at=delivery.created_at,
            completed_at=delivery.completed_at,
        )
        for delivery, event in rows
    ]
    next_cursor = None
    if len(rows) == limit:
        last = rows[-1][0]
        next_cursor = encode_cursor(
            Cursor(
                created_at=last.created_at,
                row_id=last.id,
                order="desc",
                listing=Listing.WEBHOOK_DELIVERIES,
            )
        )
    return DeliveryList(items=items, next_cursor=next_cursor, limit=limit)
