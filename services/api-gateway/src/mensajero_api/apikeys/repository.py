"""Queries on the `userapikey` table; every one but the key lookup is scoped to the owner."""

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_api.pagination import Cursor, check_cursor_origin, keyset_walk
from mensajero_common.db import attach_loaded, column_list, driver_connection
from mensajero_common.models import User, UserApiKey

_SELECT_KEY_WITH_OWNER_SQL = f"""
SELECT {column_list(UserApiKey, "k")}, {column_list(User, "u")}
FROM userapikey AS k JOIN "user" AS u ON u.id = k.user_id
WHERE k.key_hash = $1
"""


async def insert_api_key(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    name: str,
    key_hash: str,
    key_prefix: str,
    expires_at: datetime | None,
) -> UserApiKey:
    api_key = UserApiKey(
        user_id=user_id,
        name=name,
        key_hash=key_hash,
        key_prefix=key_prefix,
        expires_at=expires_at,
    )
    session.add(api_key)
    # The INSERT returns created_at, set by the database.
    await session.flush()
    return api_key


async def list_api_keys(
    session: AsyncSession, user_id: uuid.UUID, *, limit: int, after: Cursor | None
) -> Sequence[UserApiKey]:
    """Return a page of the user's keys, oldest first, after the key `after` names."""
    await check_cursor_origin(
        session,
        after,
        UserApiKey.created_at,
        UserApiKey.id,
        UserApiKey.user_id == user_id,
    )
    statement = keyset_walk(
        select(UserApiKey).where(UserApiKey.user_id == user_id).limit(limit),
        UserApiKey.created_at,
        UserApiKey.id,
        after,
        descending=False,
    )
    return (await session.scalars(statement)).all()


async def count_usable_api_keys(
    session: AsyncSession, user_id: uuid.UUID, now: datetime
) -> int:
    statement = select(func.count()).where(
        UserApiKey.user_id == user_id,
        UserApiKey.revoked_at.is_(None),
        or_(UserApiKey.expires_at.is_(None), UserApiKey.expires_at > now),
    )
    return int((await session.execute(statement)).scalar_one())


async def get_api_key(
    session: AsyncSession,
    user_id: uuid.UUID,
    key_id: uuid.UUID,
    *,
    for_update: bool = False,
) -> UserApiKey | None:
    """Find the user's key; with `for_update`, lock its row (FOR NO KEY UPDATE) until the
    transaction ends and read its current values.

    The request may have authenticated with this very key, so the session can hold it
    already, with the values read before the lock.
    """
    statement = select(UserApiKey).where(
        UserApiKey.id == key_id, UserApiKey.user_id == user_id
    )
    if for_update:
        statement = statement.with_for_update(key_share=True).execution_options(
            populate_existing=True
        )
    return (await session.scalars(statement)).one_or_none()


async def find_by_hash(
    session: AsyncSession, key_hash: str
) -> tuple[UserApiKey, User] | None:
    """Return the key with this hash and its owner, joined to `session`, or None.

    Every request with an X-API-Key starts with this read, so it runs on asyncpg
    directly and outside a transaction, like users.repository.get_request_user.
    """
    connection = await driver_connection(session, transaction=False)
    row = await connection.fetchrow(_SELECT_KEY_WITH_OWNER_SQL, key_hash)
    if row is None:
        return None
    return (
        attach_loaded(session, UserApiKey, row, "k"),
        attach_loaded(session, User, row, "u"),
    )
