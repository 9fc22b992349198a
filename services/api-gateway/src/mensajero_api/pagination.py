"""Opaque keyset cursors over (created_at, id), for the listings of messages, devices,
webhooks, webhook deliveries and API keys.

A cursor is the position of the last row of a page, not an offset, so rows inserted
between two page requests shift nothing: the next page starts strictly after that row.
It also names the listing and the order it was made for. Any other listing or order
rejects it with 400 `invalid_cursor`, because a position in one listing means nothing in
another and would return a wrong page with no error.

NOTE: created_at is the start time of the inserting transaction (Postgres now()), so rows
do not become visible in created_at order. A row committed after a page was read, with a
created_at on the already-read side of the cursor, is missed by that walk. Sends commit
within milliseconds of their now(), which keeps this window small.
"""

import base64
import binascii
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from sqlalchemy import ColumnElement, Select, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from mensajero_common import jsonutil
from mensajero_common.errors import ValidationFailedError


class KeyedRow(Protocol):
    """A row of a keyset listing: its position is (created_at, id)."""

    @property
    def created_at(self) -> datetime: ...

    @property
    def id(self) -> uuid.UUID: ...


RowT = TypeVar("RowT", bound=KeyedRow)
SelectT = TypeVar("SelectT", bound=Select[*tuple[Any, ...]])


class InvalidCursorError(ValidationFailedError):
    code = "invalid_cursor"


class Listing(StrEnum):
    """A keyset listing, as its cursors name it."""

    MESSAGES = "messages"
    INCOMING = "incoming"
    DEVICES = "devices"
    WEBHOOKS = "webhooks"
    WEBHOOK_DELIVERIES = "webhook_deliveries"
    API_KEYS = "api_keys"


@dataclass(frozen=True)
class Cursor:
    created_at: datetime
    row_id: uuid.UUID
    # The order the cursor was made for; reusing it with the other order is an error.
    order: str
    # The listing the cursor was made for. None only in a cursor handed out before
    # cursors named their listing: check_cursor_origin decides where one is accepted.
    listing: Listing | None


def encode_cursor(cursor: Cursor) -> str:
    payload = {
        "t": cursor.created_at.isoformat(),
        "i": str(cursor.row_id),
        "o": cursor.order,
    }
    if cursor.listing is not None:
        payload["l"] = cursor.listing.value
    return base64.urlsafe_b64encode(jsonutil.dumps(payload)).rstrip(b"=").decode()


def decode_cursor(token: str, order: str, listing: Listing) -> Cursor:
    """Read a cursor made by encode_cursor for the same `order` and `listing`, or raise
    InvalidCursorError.

    A cursor without a listing is returned with `listing` None, and the listing's query
    must pass it to check_cursor_origin before using it.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = jsonutil.loads(raw)
        cursor = Cursor(
            created_at=datetime.fromisoformat(payload["t"]),
            row_id=uuid.UUID(payload["i"]),
            order=payload["o"],
            listing=Listing(payload["l"]) if "l" in payload else None,
        )
    except (binascii.Error, ValueError, TypeError, KeyError, jsonutil.JSONDecodeError):
        raise InvalidCursorError() from None

    if cursor.order != order or cursor.created_at.tzinfo is None:
        raise InvalidCursorError()
    if cursor.listing is not None and cursor.listing != listing:
        raise InvalidCursorError()
    # encode_cursor writes times in UTC. A forged time whose offset moves it past what a
    # datetime can hold in UTC (9999-12-31T23:59:59-14:00) fails here, not in asyncpg.
    try:
        created_at = cursor.created_at.astimezone(UTC)
    except OverflowError:
        raise InvalidCursorError() from None
    return replace(cursor, created_at=created_at)


async def check_cursor_origin(
    session: AsyncSession,
    after: Cursor | None,
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[uuid.UUID],
    owner: ColumnElement[bool],
) -> None:
    """Raise InvalidCursorError for a cursor without a listing whose row is not one of
    the rows (`created_at`, `row_id`) that `owner` selects.

    Such a cursor was handed out before cursors named their listing. Its row shows
    which listing made it, so it keeps working on that listing only.
    """
    # NOTE: a listing whose cursor row was deleted since rejects that old cursor too,
    # and the client starts again from the first page.
    if after is None or after.listing is not None:
        return

    statement = select(row_id).where(
        row_id == after.row_id, created_at == after.created_at, owner
    )
    if await session.scalar(statement) is None:
        raise InvalidCursorError()


def split_page(
    rows: Sequence[RowT], limit: int, order: str, listing: Listing
) -> tuple[list[RowT], str | None]:
    """Cut `limit` + 1 rows fetched in `order` into a page and the cursor of the next one.

    The extra row only shows that a next page exists, so the cursor is None exactly on
    the last page, even when that page is full.
    """
    if len(rows) <= limit:
        return list(rows), None
    page = list(rows[:limit])
    last = page[-1]
    cursor = Cursor(
        created_at=last.created_at, row_id=last.id, order=order, listing=listing
    )
    return page, encode_cursor(cursor)


def keyset_walk(
    statement: SelectT,
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[uuid.UUID],
    after: Cursor | None,
    *,
    descending: bool,
) -> SelectT:
    """Order `statement` by (created_at, id) and keep the rows that come after `after`.

    The condition is a row comparison, so Postgres walks a (…, created_at, id) index.
    """
    position = tuple_(created_at, row_id)
    if after is not None:
        boundary = tuple_(after.created_at, after.row_id)
        statement = statement.where(
            position < boundary if descending else position > boundary
        )
    if descending:
        return statement.order_by(created_at.desc(), row_id.desc())
    return statement.order_by(created_at.asc(), row_id.asc())
