import httpx
import pytest

from mensajero_common.settings import Settings
from mensajero_hub.main import create_app

WS_PATH = "/api/v1/android/ws"
EN = {"Accept-Language": "en"}


async def test_hub_readyz_reports_dependencies(hub_url: str) -> None:
    async with httpx.AsyncClient(base_url=hub_url) as client:
        ready = await client.get("/readyz")
        metrics = await client.get("/metrics")

    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"postgres": "ok", "redis": "ok"}}
    assert metrics.status_code == 200
    assert "mensajero_connected_devices" in metrics.text


async def test_hub_health_probes_answer_head(hub_url: str) -> None:
    async with httpx.AsyncClient(base_url=hub_url) as client:
        healthz = await client.head("/healthz")
        readyz = await client.head("/readyz")

    assert healthz.status_code == 200
    assert healthz.content == b""
    assert readyz.status_code == 200


async def test_hub_unknown_path_envelope(hub_url: str) -> None:
    async with httpx.AsyncClient(base_url=hub_url) as client:
        default = await client.get("/nope")
        english = await client.get("/nope", headers=EN)

    assert default.status_code == 404
    assert default.json() == {
        "success": False,
        "error": "not_found",
        "message": "El recurso solicitado no existe.",
    }
    assert default.headers["content-language"] == "es"
    assert english.status_code == 404
    assert english.json() == {
        "success": False,
        "error": "not_found",
        "message": "The requested resource does not exist.",
    }
    assert english.headers["content-language"] == "en"


async def test_hub_wrong_method_envelope(hub_url: str) -> None:
    async with httpx.AsyncClient(base_url=hub_url) as client:
        on_healthz = await client.post("/healthz", headers=EN)
        on_websocket_path = await client.post(WS_PATH)

    assert on_healthz.status_code == 405
    assert on_healthz.json() == {
        "success": False,
        "error": "method_not_allowed",
        "message": "HTTP method not allowed on this path.",
    }
    assert set(on_healthz.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert on_websocket_path.status_code == 405
    assert on_websocket_path.json()["error"] == "method_not_allowed"
    assert on_websocket_path.json()["message"] == (
        "Método HTTP no permitido en esta ruta."
    )


async def test_hub_websocket_path_without_upgrade(hub_url: str) -> None:
    async with httpx.AsyncClient(base_url=hub_url) as client:
        default = await client.get(WS_PATH, params={"api_key": "mdk_x"})
        english = await client.get(WS_PATH, headers=EN)

    assert default.status_code == 426
    assert default.headers["upgrade"] == "websocket"
    assert default.headers["content-language"] == "es"
    assert default.json() == {
        "success": False,
        "error": "websocket_upgrade_required",
        "message": "Esta ruta solo acepta conexiones WebSocket: conéctate con un "
        "cliente WebSocket (ws:// o wss://) y el parámetro api_key en la URL.",
    }
    assert english.status_code == 426
    assert english.json() == {
        "success": False,
        "error": "websocket_upgrade_required",
        "message": "This path accepts only WebSocket connections: connect with a "
        "WebSocket client (ws:// or wss://) and the api_key query parameter.",
    }


@pytest.mark.parametrize("default_language", ["es", "en"])
async def test_hub_errors_follow_default_language(
    settings: Settings, default_language: str
) -> None:
    # The lifespan is not run: error responses need neither Postgres nor Redis.
    app = create_app(settings.model_copy(update={"DEFAULT_LANGUAGE": default_language}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        unnamed = await client.get("/nope")
        other = await client.get("/nope", headers={"Accept-Language": "fr"})

    assert unnamed.headers["content-language"] == default_language
    assert other.headers["content-language"] == default_language
