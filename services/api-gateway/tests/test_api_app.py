import dataclasses

import httpx
import pytest
from api_test_helpers import ApiUser
from fastapi import FastAPI
from httpx import AsyncClient
from redis.asyncio import Redis
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.main import MAX_REQUEST_BODY_BYTES, create_app
from mensajero_common.i18n import translate
from mensajero_common.models import UserPlan
from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, scaled, serve_app


async def test_healthz(client: AsyncClient) -> None:
    response = await client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz(client: AsyncClient) -> None:
    response = await client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"postgres": "ok", "redis": "ok"},
    }


async def test_health_probes_answer_head(
    settings: Settings, session_factory: object
) -> None:
    """Uptime monitors often probe with HEAD."""
    async with (
        serve_app(create_app(settings)) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=scaled(10)) as client,
    ):
        healthz = await client.head("/healthz")
        readyz = await client.head("/readyz")

    assert healthz.status_code == 200
    assert healthz.content == b""
    assert readyz.status_code == 200


async def test_head_answers_every_get_route_without_a_body(
    settings: Settings, session_factory: object, user: ApiUser
) -> None:
    """A monitor or `curl -I` gets what a GET would, headers only."""
    async with (
        serve_app(create_app(settings)) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=scaled(10)) as client,
    ):
        get = await client.get("/api/v1/users/me", headers=user.headers)
        head = await client.head("/api/v1/users/me", headers=user.headers)
        anonymous = await client.head("/api/v1/sms/messages")
        post_only = await client.head("/api/v1/sms/send", headers=user.headers)

    assert get.status_code == 200
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    assert head.headers["content-type"] == "application/json"
    assert anonymous.status_code == 401
    assert anonymous.content == b""
    assert "WWW-Authenticate" in anonymous.headers
    assert post_only.status_code == 405
    assert post_only.headers["allow"] == "POST"


async def test_trailing_slash_redirect_keeps_the_client_url(
    settings: Settings, session_factory: object, user: ApiUser
) -> None:
    """The Location is relative, whatever Host the request names."""
    async with (
        serve_app(create_app(settings)) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=scaled(10)) as client,
    ):
        send = await client.post(
            "/api/v1/sms/send/",
            headers={**user.headers, "Host": "attacker.example"},
            json={"to": "+34600000000", "body": "hola"},
        )
        listing = await client.get(
            "/api/v1/sms/messages/?limit=5&order=asc", headers=user.headers
        )
        unknown = await client.get("/api/v1/nothing-here/")
        encoded = await client.get(
            "/api/v1/sms/messages/%2541%20%3F/", headers=user.headers
        )
        # Followed with its method and body, as a 307 requires.
        followed = await client.post(
            "/api/v1/sms/send/",
            headers=user.headers,
            json={"to": "+34600000000", "body": "hola"},
            follow_redirects=True,
        )

    assert send.status_code == 307
    assert send.headers["location"] == "/api/v1/sms/send"
    assert listing.status_code == 307
    assert listing.headers["location"] == "/api/v1/sms/messages?limit=5&order=asc"
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "not_found"
    assert encoded.status_code == 307
    assert encoded.headers["location"] == "/api/v1/sms/messages/%2541%20%3F"
    assert followed.status_code == 201


async def test_readyz_names_an_unreachable_dependency(
    app: FastAPI, client: AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Redis client aimed at a loopback port where nothing listens.
    unreachable = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    resources = dataclasses.replace(app.state.resources, redis=unreachable)
    monkeypatch.setattr(app.state, "resources", resources)
    try:
        response = await client.get("/readyz")
    finally:
        await unreachable.aclose()

    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"postgres": "ok", "redis": "unavailable"},
    }


async def test_docs_and_openapi(client: AsyncClient) -> None:
    docs = await client.get("/docs")
    redoc = await client.get("/redoc")
    schema = await client.get("/openapi.json")

    assert docs.status_code == 200
    assert redoc.status_code == 200
    paths = schema.json()["paths"]
    for path in (
        "/api/v1/users/signup",
        "/api/v1/login/access-token",
        "/api/v1/users/me",
        "/api/v1/sms/devices",
        "/api/v1/sms/devices/{device_id}",
        "/api/v1/sms/devices/{device_id}/rotate-key",
        "/api/v1/sms/send",
        "/api/v1/sms/messages",
        "/api/v1/sms/messages/{message_id}",
        "/api/v1/sms/incoming",
    ):
        assert path in paths, path
    security = schema.json()["components"]["securitySchemes"]
    assert security["OAuth2PasswordBearer"]["flows"]["password"]["tokenUrl"] == (
        "/api/v1/login/access-token"
    )


async def test_openapi_describes_rate_limit_and_outage(client: AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()

    for path, operations in schema["paths"].items():
        if not path.startswith("/api/"):
            continue
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "429" in responses, (method, path)
            assert "503" in responses, (method, path)
    send = schema["paths"]["/api/v1/sms/send"]["post"]["responses"]["429"]
    login = schema["paths"]["/api/v1/login/access-token"]["post"]["responses"]["429"]
    assert "QuotaErrorBody" in str(send)
    assert "TooManyLoginAttemptsErrorBody" in str(login)
    assert "QuotaErrorBody" not in str(login)


async def test_unknown_route_envelope(client: AsyncClient) -> None:
    default = await client.get("/api/v1/nothing-here")
    english = await client.get(
        "/api/v1/nothing-here", headers={"Accept-Language": "en"}
    )

    assert default.status_code == 404
    assert default.json() == {
        "success": False,
        "error": "not_found",
        "message": "El recurso solicitado no existe.",
    }
    assert english.json()["message"] == "The requested resource does not exist."


@pytest.mark.parametrize(
    ("accept_language", "expected"),
    [
        ("en-US;q=0.5, es;q=0.9", "es"),
        ("*", "es"),
        ("garbage", "es"),
        # The name of the q parameter is case-insensitive.
        ("en;Q=0.1, es;Q=0.9", "es"),
        ("en; q = 0.1, es", "es"),
        # A q value outside 0 to 1, or not a number, makes its entry not acceptable.
        ("en;q=nan, es;q=0.5", "es"),
        ("en;q=inf, es;q=0.5", "es"),
        ("en;q=2, es;q=0.5", "es"),
        ("en;q=-1, es;q=0.5", "es"),
        # "*" matches every language that no other entry names.
        ("en;q=0.5, *", "es"),
        ("es;q=0, *", "en"),
        ("*;q=0, en", "en"),
    ],
)
async def test_error_language_negotiated(
    client: AsyncClient, accept_language: str, expected: str
) -> None:
    response = await client.get(
        "/api/v1/nothing-here", headers={"Accept-Language": accept_language}
    )

    assert response.headers["content-language"] == expected
    assert response.json()["message"] == translate("not_found", expected)


async def test_wrong_method_envelope(client: AsyncClient) -> None:
    response = await client.delete("/api/v1/sms/send")

    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    assert "POST" in response.headers["allow"]


async def test_malformed_json_is_422(client: AsyncClient, user: ApiUser) -> None:
    response = await client.post(
        "/api/v1/sms/send",
        content=b'{"to": "+34612345678", "body": ',
        headers={**user.headers, "Content-Type": "application/json"},
    )

    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"
    assert response.json()["details"][0]["type"] == "json_invalid"


async def test_body_over_limit_is_413(client: AsyncClient, user: ApiUser) -> None:
    response = await client.post(
        "/api/v1/sms/send",
        content=b'{"body": "' + b"x" * MAX_REQUEST_BODY_BYTES + b'"}',
        headers={**user.headers, "Content-Type": "application/json"},
    )

    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert str(MAX_REQUEST_BODY_BYTES) in response.json()["message"]


async def test_unexpected_error_is_logged_500(
    app: FastAPI, client: AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    async def explode() -> None:
        raise RuntimeError("boom in a handler")

    app.add_api_route("/explode", explode)

    response = await client.get("/explode", headers={"Accept-Language": "en"})

    assert response.status_code == 500
    assert response.json() == {
        "success": False,
        "error": "internal_error",
        "message": "Internal server error. Try again later.",
    }
    logged = capsys.readouterr()
    assert "boom in a handler" in logged.out + logged.err


async def test_missing_default_plan_stops_start(settings: Settings) -> None:
    broken = settings.model_copy(update={"DEFAULT_PLAN": "platinum"})
    app = create_app(broken)

    with pytest.raises(RuntimeError, match="DEFAULT_PLAN is 'platinum'"):
        async with app.router.lifespan_context(app):
            pass


async def test_inactive_default_plan_stops_start(
    settings: Settings, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    async def set_basic_active(active: bool) -> None:
        async with session_factory() as session:
            await session.execute(
                update(UserPlan)
                .where(UserPlan.code == "basic")
                .values(is_active=active)
            )
            await session.commit()

    app = create_app(settings.model_copy(update={"DEFAULT_PLAN": "basic"}))
    await set_basic_active(False)
    try:
        with pytest.raises(RuntimeError, match=r"'basic' but the plan .* is inactive"):
            async with app.router.lifespan_context(app):
                pass
    finally:
        await set_basic_active(True)


async def test_serves_over_real_socket(
    settings: Settings, session_factory: object
) -> None:
    async with (
        serve_app(create_app(settings)) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=scaled(10)) as client,
    ):
        health = await client.get("/healthz")
        signup = await client.post(
            "/api/v1/users/signup",
            json={"email": "socket@example.com", "password": "over-tcp-123"},
        )
        login = await client.post(
            "/api/v1/login/access-token",
            data={"username": "socket@example.com", "password": "over-tcp-123"},
        )
        token = login.json()["access_token"]
        me = await client.get(
            "/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}
        )

    assert health.json() == {"status": "ok"}
    assert signup.status_code == 201
    assert me.json()["data"]["email"] == "socket@example.com"
