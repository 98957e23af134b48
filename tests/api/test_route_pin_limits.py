"""A bad route pin is refused before the per-key limits: it does not use up the key's rpm."""

from __future__ import annotations

from pathlib import Path

import httpx
from tests.conftest import gateway_settings

from imagegate.app import create_app

KEY = "sk-pin-limited-1234"


async def test_an_invalid_route_pin_does_not_use_up_the_keys_rpm(tmp_path: Path) -> None:
    settings = gateway_settings(tmp_path, auth={"keys": [{"name": "pinned", "key": KEY, "rpm": 1}]})
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": "sandbox-image", "prompt": "x", "size": "256x256"}
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://g") as http:
        for pin in ("7", "nowhere", "sandbox:other"):
            bad = await http.post("/v1/images/generations", json=body, headers={**headers, "x-imagegate-route": pin})
            assert bad.status_code == 400, bad.text
            error = bad.json()["error"]
            assert (error["type"], error["param"]) == ("invalid_request_error", "x-imagegate-route")
            assert "x-ratelimit-remaining-requests" not in bad.headers
        ok = await http.post("/v1/images/generations", json=body, headers={**headers, "x-imagegate-route": "0"})
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-ratelimit-remaining-requests"] == "0"
        limited = await http.post("/v1/images/generations", json=body, headers=headers)
        assert limited.status_code == 429  # the one request the key may make per minute was the good one
