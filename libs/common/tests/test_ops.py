import httpx
from fastapi import FastAPI

from mensajero_common.ops import MetricsMiddleware, create_ops_app, metrics_response


async def _ok() -> None:
    return None


async def _down() -> None:
    raise ConnectionError("refused")


async def test_ops_app_reports_readiness() -> None:
    ready_app = create_ops_app(lambda: {"postgres": _ok, "redis": _ok})
    down_app = create_ops_app(lambda: {"postgres": _ok, "redis": _down})

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(ready_app), base_url="http://ops"
    ) as client:
        ready = await client.get("/readyz")
        health = await client.get("/healthz")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(down_app), base_url="http://ops"
    ) as client:
        down = await client.get("/readyz")

    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert down.status_code == 503
    assert down.json()["checks"] == {"postgres": "ok", "redis": "unavailable"}


async def test_metrics_middleware_labels_route_template() -> None:
    app = FastAPI()
    app.add_middleware(MetricsMiddleware, service="test-service")

    @app.get("/things/{thing_id}")
    async def read_thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    @app.get("/metrics")
    async def metrics() -> object:
        return metrics_response()

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://app"
    ) as client:
        await client.get("/things/1")
        await client.get("/things/2")
        await client.get("/nowhere")
        scraped = (await client.get("/metrics")).text

    assert (
        'route="/things/{thing_id}",service="test-service",status="200"} 2.0' in scraped
    )
    assert 'route="unmatched",service="test-service",status="404"' in scraped
    assert "/things/1" not in scraped
