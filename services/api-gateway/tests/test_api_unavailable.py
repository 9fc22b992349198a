"""Requests that find Postgres unavailable get 503 `service_unavailable`, not a 500."""

import dataclasses
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI
from httpx import AsyncClient
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from mensajero_api.auth import service as auth_service
from mensajero_api.envelope import ServiceUnavailableErrorBody
from mensajero_api.errors import UNAVAILABLE_RETRY_AFTER_S
from mensajero_common.db import create_engine
from mensajero_common.settings import Settings
from mensajero_common.testing import settings_without_connections


@pytest.fixture
async def limited_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine whose Postgres role may open no connection at all, so every checkout
    fails the way a server out of connections makes it fail (SQLSTATE 53300)."""
    async with settings_without_connections(settings) as limited:
        engine = create_engine(limited)
        try:
            yield engine
        finally:
            await engine.dispose()


@pytest.fixture
def postgres_out_of_connections(
    app: FastAPI, limited_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = dataclasses.replace(
        app.state.resources,
        engine=limited_engine,
        session_factory=async_sessionmaker(limited_engine, expire_on_commit=False),
    )
    monkeypatch.setattr(app.state, "resources", resources)


@pytest.mark.usefixtures("postgres_out_of_connections")
async def test_login_without_connections_gives_503(
    client: AsyncClient,
) -> None:
    response = await client.post(
        "/api/v1/login/access-token",
        data={"username": "someone@example.com", "password": "whatever-password"},
    )

    assert response.status_code == 503
    assert response.headers["Retry-After"] == str(UNAVAILABLE_RETRY_AFTER_S)
    assert response.headers["Content-Language"] == "es"
    ServiceUnavailableErrorBody.model_validate(response.json())
    assert response.json() == {
        "success": False,
        "error": "service_unavailable",
        "message": (
            "El servicio no está disponible en este momento. Repite la solicitud en "
            "unos segundos."
        ),
    }


@pytest.mark.usefixtures("postgres_out_of_connections")
async def test_unavailable_message_in_english(client: AsyncClient) -> None:
    response = await client.post(
        "/api/v1/login/access-token",
        data={"username": "someone@example.com", "password": "whatever-password"},
        headers={"Accept-Language": "en-GB,en;q=0.9"},
    )

    assert response.status_code == 503
    assert response.json()["message"] == (
        "The service is unavailable right now. Repeat the request in a few seconds."
    )


async def test_login_bug_still_gives_500(
    client: AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: object, **__: object) -> None:
        raise ValueError("a bug, not an outage")

    monkeypatch.setattr(auth_service, "authenticate", broken)
    response = await client.post(
        "/api/v1/login/access-token",
        data={"username": "someone@example.com", "password": "whatever-password"},
    )

    assert response.status_code == 500
    assert response.json()["error"] == "internal_error"
    assert "Retry-After" not in response.headers
