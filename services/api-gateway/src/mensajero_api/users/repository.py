"""Queries on the `user` table."""

import uuid

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common.db import attach_loaded, column_list, driver_connection
from mensajero_common.models import User

_SELECT_USER_SQL = f'SELECT {column_list(User)} FROM "user" WHERE id = $1'


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> User | None:
    return await session.get(User, user_id)


async def get_request_user(session: AsyncSession, user_id: uuid.UUID) -> User | None:
    """Load the user behind a request's credentials into `session`, like get_user.

    Every authenticated request starts with this read, so it runs on asyncpg directly
    and outside a transaction: through the ORM it cost more CPU than the rest of a send.
    The user joins the session as if loaded there, so changes to it are saved on commit.
    """
    identity = session.identity_key(User, user_id)
    if identity in session.identity_map:
        return session.identity_map[identity]  # type: ignore[no-any-return]
    connection = await driver_connection(session, transaction=False)
    row = await connection.fetchrow(_SELECT_USER_SQL, user_id)
    return None if row is None else attach_loaded(session, User, row)


async def lock_user(session: AsyncSession, user_id: uuid.UUID) -> None:
    """Lock the user's row until the caller's transaction ends.

    Requests that count the user's rows before inserting one (webhooks, API keys) take
    this lock first, so they run one at a time and each count includes the rows that
    the one before committed. FOR NO KEY UPDATE leaves the FOR KEY SHARE locks of foreign
    key checks free, so inserts of the user's messages and devices never wait for it.
    """
    statement = (
        select(User.id).where(User.id == user_id).with_for_update(key_share=True)
    )
    await session.execute(statement)


async def get_user_by_email(
    session: AsyncSession, email: str, email_before_nfkc: str | None = None
) -> User | None:
    """Find a user by email, ignoring letter case as the unique index does.

    `email` is normalized as sign-up stores it now (see normalize_email). Migration
    0016 kept an address in its older, pre-NFKC form where the NFKC form belonged to
    another account. Such an account is found only by `email_before_nfkc`, the address
    normalized as sign-up did it before, which wins over a match of `email`.
    """
    folded = email.lower()
    if email_before_nfkc is None or email_before_nfkc.lower() == folded:
        statement = select(User).where(func.lower(User.email) == folded)
        return (await session.scalars(statement)).one_or_none()

    exact = email_before_nfkc.lower()
    statement = (
        select(User)
        .where(func.lower(User.email).in_([folded, exact]))
        .order_by((func.lower(User.email) == exact).desc())
        .limit(1)
    )
    return (await session.scalars(statement)).first()


async def insert_user(
    session: AsyncSession,
    *,
    email: str,
    hashed_password: str,
    full_name: str | None = None,
    default_region: str | None = None,
    is_superuser: bool = False,
) -> User | None:
    """Insert a user, or return None when the email is taken (in any letter case)."""
    statement = (
        insert(User)
        .values(
            email=email,
            hashed_password=hashed_password,
            full_name=full_name,
            default_region=default_region,
            is_superuser=is_superuser,
        )
        # The only unique keys are the random id and lower(email), so a conflict can
        # only mean the email is taken, even when a concurrent sign-up took it first.
        .on_conflict_do_nothing()
        .returning(User)
    )
    return (await session.scalars(statement)).one_or_none()
