"""An API key sent under another Authorization scheme than Bearer: a 401 that says so."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest
from tests.conftest import gateway_settings

from imagegate.app import create_app

KEY = "sk-scheme-test-1234"


@pytest.mark.parametrize(
    "authorization",
    [f"Basic {KEY}", "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode(), f"Token {KEY}", f"basic {KEY}"],
)
async def test_a_key_under_another_scheme_is_told_to_use_bearer(tmp_path: Path, authorization: str) -> None:
    app = create_app(gateway_settings(tmp_path, auth={"keys": [{"name": "a", "key": KEY}]}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://g") as http:
        response = await http.get("/v1/models", headers={"authorization": authorization})
    assert response.status_code == 401
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("authentication_error", "invalid_api_key", None)
    scheme = authorization.split(" ")[0]
    assert f"`{scheme}` scheme" in error["message"] and "Authorization: Bearer <key>" in error["message"]
    assert "didn't provide" not in error["message"]
    assert KEY not in response.text and authorization.split(" ")[1] not in response.text
    assert response.headers["www-authenticate"] == "Bearer"


async def test_a_missing_key_still_says_it_is_missing(tmp_path: Path) -> None:
    app = create_app(gateway_settings(tmp_path, auth={"keys": [{"name": "a", "key": KEY}]}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://g") as http:
        response = await http.get("/v1/models")
        weird = await http.get("/v1/models", headers={"authorization": "B@sic<script> " + KEY})
    assert response.status_code == 401 and "didn't provide an API key" in response.json()["error"]["message"]
    assert weird.status_code == 401 and "<script>" not in weird.text and KEY not in weird.text
    assert "Bearer" in weird.json()["error"]["message"]
