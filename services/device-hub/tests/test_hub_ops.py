import httpx


async def test_hub_readyz_reports_dependencies(hub_url: str) -> None:
    async with httpx.AsyncClient(base_url=hub_url) as client:
        ready = await client.get("/readyz")
        metrics = await client.get("/metrics")

    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"postgres": "ok", "redis": "ok"}}
    assert metrics.status_code == 200
    assert "mensajero_connected_devices" in metrics.text
