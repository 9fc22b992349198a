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
