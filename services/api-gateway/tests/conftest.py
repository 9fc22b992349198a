"""Fixtures of the api-gateway tests: the app inside its lifespan, a client, and users.

Hashing with the production argon2 parameters takes about 0.1 s. So users made by
`make_user` share a hash computed once per test session and get their token from
`create_access_token`. The sign-up and login tests go through the real endpoints.

The `client` fixture fails any request whose 422 body has an item of a validation error
type without a Spanish and an English message, so every test checks the catalog.
"""

import uuid
from collections.abc import AsyncIterator

import pytest
from api_test_helpers import TEST_PASSWORD, ApiUser, MakeUser
from fastapi import FastAPI
from httpx import ASGITransport, AsyncClient, Response
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.auth.security import PasswordHasher, create_access_token
from mensajero_api.main import create_app
from mensajero_api.quotas import repository as quotas_repository
from mensajero_api.users import repository as users_repository
from mensajero_common.settings import Settings
from mensajero_common.validation_messages import VALIDATION_MESSAGES


@pytest.fixture(scope="session")
async def password_hash() -> str:
    return await PasswordHasher().hash(TEST_PASSWORD)


@pytest.fixture
async def app(
    settings: Settings,
    session_factory: async_sessionmaker[AsyncSession],
    redis: object,
) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


async def check_validation_messages(response: Response) -> None:
    """Raise AssertionError for a 422 item whose type has no message in both languages."""
    if response.status_code != 422:
        return
    await response.aread()
    body = response.json()
    if body.get("error") != "validation_error":
        return
    for item in body["details"]:
        templates = VALIDATION_MESSAGES.get(item["type"], {})
        assert set(templates) == {"es", "en"}, (
            f"validation error type {item['type']!r} of field {item['field']!r} has "
            "no Spanish and English message in mensajero_common.validation_messages"
        )


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[AsyncClient]:
    transport = ASGITransport(app=app)
    async with AsyncClient(
        transport=transport,
        base_url="http://testserver",
        event_hooks={"response": [check_validation_messages]},
    ) as client:
        yield client


@pytest.fixture
def make_user(
    session_factory: async_sessionmaker[AsyncSession],
    settings: Settings,
    password_hash: str,
) -> MakeUser:
    async def make(
        email: str | None = None,
        *,
        default_region: str | None = None,
        plan: str = "free",
    ) -> ApiUser:
        email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
        async with session_factory() as session:
            user = await users_repository.insert_user(
                session,
                email=email,
                hashed_password=password_hash,
                default_region=default_region,
            )
            assert user is not None
            plan_row = await quotas_repository.get_plan_by_code(session, plan)
            assert plan_row is not None
            await quotas_repository.insert_quota(session, user.id, plan_row.id)
            await session.commit()
        token = create_access_token(user.id, 0, settings).token
        return ApiUser(id=user.id, email=email, password=TEST_PASSWORD, token=token)

    return make


@pytest.fixture
async def user(make_user: MakeUser) -> ApiUser:
    return await make_user(plan="pro")
