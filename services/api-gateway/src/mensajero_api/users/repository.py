"""Queries on the `user` table."""

import uuid

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from mensajero_common.models import User


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> User | None:
    return await session.get(User, user_id)


async def get_user_by_email(session: AsyncSession, email: str) -> User | None:
    """Find a user by email, ignoring letter case as the unique index does."""
    statement = select(User).where(func.lower(User.email) == email.lower())
    return (await session.scalars(statement)).one_or_none()


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
