import base64
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from mensajero_api.auth import security
from mensajero_api.auth.security import (
    TokenDecodeError,
    create_access_token,
    decode_access_token,
)
from mensajero_api.blank_text import is_blank
from mensajero_api.jsonbody import MAX_JSON_DEPTH, JSONBodyError, parse_json_body
from mensajero_api.pagination import (
    Cursor,
    InvalidCursorError,
    Listing,
    decode_cursor,
    encode_cursor,
)
from mensajero_api.quotas.service import next_quota_reset
from mensajero_api.types import is_storable
from mensajero_common.settings import Settings


@pytest.mark.parametrize(
    ("now", "reset_day", "expected"),
    [
        (datetime(2024, 1, 15, 10, tzinfo=UTC), 1, datetime(2024, 2, 1, tzinfo=UTC)),
        (
            datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC),
            1,
            datetime(2024, 2, 1, tzinfo=UTC),
        ),
        (datetime(2024, 1, 9, 23, tzinfo=UTC), 10, datetime(2024, 1, 10, tzinfo=UTC)),
        (datetime(2024, 12, 31, 23, tzinfo=UTC), 1, datetime(2025, 1, 1, tzinfo=UTC)),
        (datetime(2024, 12, 28, 12, tzinfo=UTC), 28, datetime(2025, 1, 28, tzinfo=UTC)),
        # 20:00 on Jan 31 in Mexico City is already Feb 1 in UTC.
        (
            datetime(2024, 1, 31, 20, tzinfo=timezone(timedelta(hours=-6))),
            1,
            datetime(2024, 3, 1, tzinfo=UTC),
        ),
    ],
)
def test_next_quota_reset(now: datetime, reset_day: int, expected: datetime) -> None:
    assert next_quota_reset(now, reset_day) == expected


def test_cursor_round_trip() -> None:
    cursor = Cursor(
        created_at=datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
        row_id=uuid.uuid4(),
        order="desc",
        listing=Listing.DEVICES,
    )

    token = encode_cursor(cursor)

    assert "=" not in token
    assert decode_cursor(token, "desc", Listing.DEVICES) == cursor
    with pytest.raises(InvalidCursorError):
        decode_cursor(token, "asc", Listing.DEVICES)


def test_cursor_rejects_other_listing() -> None:
    token = encode_cursor(
        Cursor(
            created_at=datetime(2024, 5, 1, tzinfo=UTC),
            row_id=uuid.uuid4(),
            order="desc",
            listing=Listing.MESSAGES,
        )
    )

    for listing in Listing:
        if listing == Listing.MESSAGES:
            continue
        with pytest.raises(InvalidCursorError):
            decode_cursor(token, "desc", listing)


def test_cursor_without_listing_decodes() -> None:
    row_id = uuid.uuid4()
    payload = {"t": "2024-05-01T12:00:00+00:00", "i": str(row_id), "o": "asc"}
    token = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()

    cursor = decode_cursor(token, "asc", Listing.API_KEYS)

    assert cursor.listing is None
    assert cursor.row_id == row_id


def test_cursor_rejects_unknown_listing() -> None:
    payload = {"t": "2024-05-01T12:00:00+00:00", "i": str(uuid.uuid4()), "o": "asc"}
    for listing in ("users", 7, None):
        raw = json.dumps({**payload, "l": listing}).encode()
        token = base64.urlsafe_b64encode(raw).decode()
        with pytest.raises(InvalidCursorError):
            decode_cursor(token, "asc", Listing.API_KEYS)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "%%%",
        "bm90IGpzb24",
        "W10",
        "eyJ0IjoiMjAyNC0wMS0wMSIsImkiOiJ4IiwibyI6ImRlc2MifQ",
    ],
)
def test_cursor_rejects_garbage(token: str) -> None:
    with pytest.raises(InvalidCursorError):
        decode_cursor(token, "desc", Listing.MESSAGES)


def test_access_token_claims(settings: Settings) -> None:
    user_id = uuid.uuid4()
    token = create_access_token(user_id, 3, settings)

    claims = decode_access_token(token.token, settings)

    assert claims.user_id == user_id
    assert claims.token_version == 3
    assert token.expires_in_s == settings.ACCESS_TOKEN_EXPIRE_MINUTES * 60


def test_access_token_expires_after_a_verified_use(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = create_access_token(uuid.uuid4(), 0, settings)
    decode_access_token(issued.token, settings)
    expiry = datetime.now(UTC) + timedelta(seconds=issued.expires_in_s)

    # The same token again, once its `exp` has passed.
    monkeypatch.setattr(
        security.time, "time", lambda: expiry.timestamp() + 1, raising=True
    )

    with pytest.raises(TokenDecodeError, match="expired"):
        decode_access_token(issued.token, settings)


def test_access_token_other_secret(settings: Settings) -> None:
    token = create_access_token(uuid.uuid4(), 0, settings).token
    other = settings.model_copy(update={"SECRET_KEY": "x" * 48})

    with pytest.raises(TokenDecodeError):
        decode_access_token(token, other)


@pytest.mark.parametrize(
    ("value", "storable"),
    [
        ("Hola, ¿qué tal? 😀", True),
        ("", True),
        ("a\x00b", False),
        ("lone \ud800 high", False),
        ("lone \udfff low", False),
        ("\ud83d", False),
    ],
)
def test_is_storable(value: str, storable: bool) -> None:
    assert is_storable(value) is storable


@pytest.mark.parametrize(
    "document",
    [
        '{"a": "' + "[" * 100 + '"}',
        '["\\"' + "{" * 100 + '"]',
        "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH,
    ],
)
def test_parse_json_body_skips_strings(document: str) -> None:
    assert parse_json_body(document.encode()) is not None


def test_parse_json_body_too_deep_after_escape() -> None:
    document = '["\\"]", ' + "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)

    with pytest.raises(JSONBodyError) as raised:
        parse_json_body(document.encode())

    assert raised.value.pos == document.index("[", 1) + MAX_JSON_DEPTH - 1


def test_parse_json_body_unterminated_string() -> None:
    document = '["' + "[" * 100

    with pytest.raises(json.JSONDecodeError) as raised:
        parse_json_body(document.encode())

    assert not isinstance(raised.value, JSONBodyError)
    assert raised.value.msg.startswith("Unterminated string")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", True),
        (" \t\n\u00a0\u3000", True),
        ("\u200b", True),
        ("\u200c\u200d", True),
        ("\u2060\ufeff\u00ad", True),
        ("\u202e\u2066", True),
        ("\u115f\u3164\uffa0", True),
        ("\ufe0f\U000e0100", True),
        ("\U000e0041\U000e007f", True),
        ("\u2800", True),
        ("\u0007\u007f\u0001", True),
        ("\u0301\u20dd", True),
        ("\ufff9\ufffb", True),
        ("\ufffe\ufdd0\U0010ffff", True),
        ("e\u0301", False),
        ("1\ufe0f\u20e3", False),
        ("\U0001fae8", False),
        ("a", False),
        ("\u200ba\u200b", False),
        ("👩\u200d💻", False),
        ("❤\ufe0f", False),
        ("\u0600", False),
        (".", False),
    ],
)
def test_is_blank(text: str, expected: bool) -> None:
    assert is_blank(text) is expected
