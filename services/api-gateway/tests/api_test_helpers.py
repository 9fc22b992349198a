"""Helpers shared by the api-gateway test modules (fixtures live in conftest.py)."""

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from httpx import AsyncClient, Response
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

TEST_PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class ApiUser:
    id: uuid.UUID
    email: str
    password: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


# make_user(email=None, *, default_region=None, plan="free") from conftest.py.
MakeUser = Callable[..., Awaitable[ApiUser]]


async def register_device(
    client: AsyncClient, owner: ApiUser, name: str = "Pixel", **fields: Any
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/sms/devices", json={"name": name, **fields}, headers=owner.headers
    )
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def send_sms(
    client: AsyncClient,
    sender: ApiUser,
    to: str = "+525512345678",
    body: str = "Hola",
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> Response:
    return await client.post(
        "/api/v1/sms/send",
        json={"to": to, "body": body, **fields},
        headers={**sender.headers, **(headers or {})},
    )


async def count_rows(
    session_factory: async_sessionmaker[AsyncSession], model: type, **where: Any
) -> int:
    statement = select(func.count()).select_from(model).filter_by(**where)
    async with session_factory() as session:
        return int(await session.scalar(statement) or 0)


async def walk_pages(
    client: AsyncClient, user: ApiUser, url: str, params: dict[str, Any]
) -> tuple[list[list[str]], list[int]]:
    """Follow `next_cursor` of a keyset listing from its first page to its last.

    Returns the item ids of each page and the `limit` each page reported.
    """
    pages: list[list[str]] = []
    limits: list[int] = []
    cursor = None
    while True:
        request = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(url, params=request, headers=user.headers)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        pages.append([item["id"] for item in data["items"]])
        limits.append(data["limit"])
        cursor = data["next_cursor"]
        if cursor is None:
            return pages, limits
        assert len(pages) <= 100, "the listing never ended"
