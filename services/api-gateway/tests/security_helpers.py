"""Helpers of the security tests: API keys, snapshots of the database, and routes."""

import hashlib
from collections.abc import Iterator
from typing import Any

from api_test_helpers import ApiUser
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from httpx import AsyncClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.deps import get_current_principal

API_KEYS_PATH = "/api/v1/users/me/api-keys"


def key_headers(api_key: str) -> dict[str, str]:
    return {"X-API-Key": api_key}


async def create_api_key(
    client: AsyncClient, owner: ApiUser, name: str = "server", **fields: Any
) -> dict[str, Any]:
    """Create a user API key with the owner's token; return the response data."""
    response = await client.post(
        API_KEYS_PATH, json={"name": name, **fields}, headers=owner.headers
    )
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def snapshot_tables(
    session_factory: async_sessionmaker[AsyncSession],
) -> dict[str, str]:
    """Return a digest of every row of every table in the public schema, per table."""
    async with session_factory() as session:
        tables = (
            await session.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                    "AND tablename <> 'alembic_version' ORDER BY tablename"
                )
            )
        ).scalars()
        digests = {}
        for table in list(tables):
            rows = (
                await session.execute(
                    text(
                        f"SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM \"{table}\" t"
                    )
                )
            ).scalar_one()
            digests[table] = rows
        return digests


async def snapshot_rows_of(
    session_factory: async_sessionmaker[AsyncSession], user_id: object
) -> dict[str, list[str]]:
    """Return every row that belongs to `user_id`, as text, per table with a user_id."""
    async with session_factory() as session:
        tables = (
            await session.execute(
                text(
                    "SELECT table_name FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND column_name = 'user_id' "
                    "ORDER BY table_name"
                )
            )
        ).scalars()
        snapshot = {}
        for table in list(tables):
            rows = await session.execute(
                text(f'SELECT t::text FROM "{table}" t WHERE user_id = :user_id'),
                {"user_id": user_id},
            )
            snapshot[table] = sorted(rows.scalars())
        user_row = await session.execute(
            text('SELECT t::text FROM "user" t WHERE id = :user_id'),
            {"user_id": user_id},
        )
        snapshot["user"] = list(user_row.scalars())
        return snapshot


def _depends_on(dependant: Dependant, target: object) -> bool:
    if dependant.call is target:
        return True
    return any(_depends_on(child, target) for child in dependant.dependencies)


def requires_credentials(route: APIRoute) -> bool:
    """Tell whether the route authenticates its caller through CurrentUser."""
    return _depends_on(route.dependant, get_current_principal)


def api_routes(app: FastAPI) -> Iterator[tuple[str, str, APIRoute]]:
    """Yield (method, path template, route) for every method of every API route.

    The routes of included routers are resolved with their prefixes, as requests see them.
    """
    for context in iter_route_contexts(app.routes):
        route = context.route
        if not isinstance(route, APIRoute):
            continue
        for method in sorted(route.methods):
            yield method, route.path, route


def body_is_required(route: APIRoute) -> bool:
    return route.body_field is not None and route.body_field.field_info.is_required()


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()
