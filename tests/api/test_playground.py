"""The playground's static files through the app (ASGI): the page at `/` and `/playground`, its
assets with the right types, caching by ETag, nothing else from the package."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tests.conftest import gateway_settings

from imagegate.app import create_app

ASSETS = {"app.js": "text/javascript", "api.js": "text/javascript", "app.css": "text/css"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The real app (the api tests' default client has only the API routers)."""
    app = create_app(gateway_settings(tmp_path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


@pytest.mark.parametrize("path", ["/", "/playground"])
async def test_the_page_is_served_with_a_strict_policy(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="playground/app.js">' in response.text
    policy = response.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "connect-src 'self' blob:;" in policy
    assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_every_module_the_page_imports_is_served(client: httpx.AsyncClient) -> None:
    app_js = (await client.get("/playground/app.js")).text
    modules = ("api.js", "form.js", "history.js", "mask.js", "render.js", "snippets.js")
    imported = {name for name in modules if f'from "./{name}"' in app_js}
    assert len(imported) == len(modules)
    for name in imported:
        response = await client.get(f"/playground/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/javascript")
    for name, media_type in ASSETS.items():
        response = await client.get(f"/playground/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)


async def test_an_unchanged_asset_is_a_304(client: httpx.AsyncClient) -> None:
    first = await client.get("/playground/app.css")
    etag = first.headers["etag"]
    again = await client.get("/playground/app.css", headers={"if-none-match": etag})
    assert again.status_code == 304 and again.content == b""
    assert (await client.get("/playground/app.css", headers={"if-none-match": '"other"'})).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/playground/missing.js",
        "/playground/__init__.py",
        "/playground/index.html",  # the page is served at / and /playground only
        "/playground/..%2F__init__.py",
        "/playground/%2e%2e%2fapi%2fplayground.py",
        "/playground/static%2Fapp.js",
        "/playground/APP.JS",
    ],
)
async def test_nothing_else_is_served(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 404


async def test_a_trailing_slash_redirects_to_the_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/playground/")
    assert response.status_code == 308 and response.headers["location"] == "../playground"


async def test_the_playground_can_be_turned_off(tmp_path: Path) -> None:
    app = create_app(gateway_settings(tmp_path, playground=False))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            assert (await c.get("/")).status_code == 404
            assert (await c.get("/playground/app.js")).status_code == 404
            assert (await c.get("/v1/models")).status_code == 200


async def test_requests_for_missing_assets_do_not_grow_memory(client: httpx.AsyncClient) -> None:
    """Every name that is not a packaged file is a 404 that leaves nothing behind: a client
    asking for endless made-up names must not grow a cache without bound."""
    from imagegate.api import playground

    assert (await client.get("/playground/app.js")).status_code == 200
    before = playground._static_file.cache_info().currsize
    for i in range(300):
        assert (await client.get(f"/playground/missing-{i}.js")).status_code == 404
    assert playground._static_file.cache_info().currsize <= max(before, 64)
    assert (await client.get("/playground/app.js")).status_code == 200
