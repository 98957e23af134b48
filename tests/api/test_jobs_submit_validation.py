"""`Prefer: respond-async` answers a bad request exactly as the synchronous call does, at once and
before anything is stored: the same status, error type, code and `param` (and message), and no job.
A request the synchronous call would serve is accepted. In-process, sandbox models (and a model whose
first route's provider has no key, so the synchronous call serves it on its second route)."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from tests.conftest import gateway_settings

from imagegate.app import create_app

ASYNC = {"prefer": "respond-async"}
KEY = "sk-validation-key-1234"
NARROW = "sk-validation-narrow-1234"
SMALL = "sk-validation-small-1234"
GEN = {"model": "sandbox-image", "prompt": "a square", "size": "64x64"}
MODELS = {
    # fal has no key in tests: a request is served on the sandbox route, as if fal were not there
    "mixed-edit": {"routes": [{"provider": "fal", "model": "fal-ai/qwen-image-edit-2511"},
                              {"provider": "sandbox", "model": "sandbox-edit"}]},
    "fal-only": {"routes": [{"provider": "fal", "model": "fal-ai/qwen-image"}]},
}


def png(width: int = 64, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (10, 200, 30, 255)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    keys = [
        {"name": "main", "key": KEY},
        {"name": "narrow", "key": NARROW, "models": ["sandbox-edit"]},
        {"name": "small", "key": SMALL, "images_per_minute": 2},
    ]
    settings = gateway_settings(
        tmp_path, auth={"keys": keys}, jobs={"poll_seconds": 0.05}, limits={"max_pixels": 1024 * 1024},
        models=MODELS,
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    headers = {"authorization": f"Bearer {KEY}"}
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=transport, base_url="http://gateway", headers=headers
    ) as c:
        yield c


async def both(client: httpx.AsyncClient, path: str, **kwargs: Any) -> tuple[httpx.Response, httpx.Response]:
    """The same request, synchronous and with `Prefer: respond-async`."""
    headers = kwargs.pop("headers", {})
    sync = await client.post(path, headers=headers, **kwargs)
    queued = await client.post(path, headers={**headers, **ASYNC}, **kwargs)
    return sync, queued


async def assert_same_refusal(
    client: httpx.AsyncClient, path: str, status: int, param: str | None, **kwargs: Any
) -> None:
    sync, queued = await both(client, path, **kwargs)
    assert sync.status_code == status, sync.text
    assert queued.status_code == status, queued.text
    assert queued.json() == sync.json()  # the whole envelope: type, code, param, message
    assert queued.headers.get("x-should-retry") == sync.headers.get("x-should-retry")
    assert sync.json()["error"]["param"] == param
    assert "location" not in queued.headers
    for token in (KEY, NARROW, SMALL):  # nothing was stored, for any key
        listed = await client.get("/v1/images/jobs", headers={"authorization": f"Bearer {token}"})
        assert listed.json()["data"] == [], listed.text


@pytest.mark.parametrize(
    ("pin", "query"),
    [("7", None), ("nowhere", None), ("sandbox:other", None), (None, "fal"), (None, "1")],
)
async def test_a_bad_route_pin(client: httpx.AsyncClient, pin: str | None, query: str | None) -> None:
    headers = {"x-imagegate-route": pin} if pin else {}
    url = "/v1/images/generations" + (f"?route={query}" if query else "")
    await assert_same_refusal(client, url, 400, "x-imagegate-route", json=GEN, headers=headers)


async def test_a_route_pin_on_a_model_the_key_may_not_use(client: httpx.AsyncClient) -> None:
    headers = {"authorization": f"Bearer {NARROW}", "x-imagegate-route": "0"}
    await assert_same_refusal(client, "/v1/images/generations", 403, "model", json=GEN, headers=headers)
    headers["x-imagegate-route"] = "nowhere"  # the allow-list speaks first, as in the synchronous call
    await assert_same_refusal(client, "/v1/images/generations", 403, "model", json=GEN, headers=headers)


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        ({**GEN, "model": "no-such-model"}, "model", 404),
        ({**GEN, "background": "transparent"}, "background", 400),  # the route's table rejects it
        ({**GEN, "output_compression": 101}, "output_compression", 400),
        ({**GEN, "size": "4096x4096"}, "size", 400),  # over limits.max_pixels
        ({**GEN, "size": "big"}, "size", 400),
        ({**GEN, "n": 0}, "n", 400),
        ({**GEN, "response_format": "jpeg"}, "response_format", 400),
    ],
)
async def test_a_bad_parameter(client: httpx.AsyncClient, body: dict[str, Any], param: str, status: int) -> None:
    await assert_same_refusal(client, "/v1/images/generations", status, param, json=body)


async def test_more_images_than_the_key_may_ever_have(client: httpx.AsyncClient) -> None:
    """n above the key's images_per_minute: no minute admits it (429, `x-should-retry: false`); a
    job would wait for an hour and fail."""
    headers = {"authorization": f"Bearer {SMALL}"}
    await assert_same_refusal(client, "/v1/images/generations", 429, None, json={**GEN, "n": 3}, headers=headers)
    dry_headers = {**headers, "x-imagegate-dry-run": "1"}
    dry = await client.post("/v1/images/generations", json={**GEN, "n": 3}, headers=dry_headers)
    assert dry.status_code == 429 and dry.headers["x-should-retry"] == "false"
    ok = await client.post("/v1/images/generations", json={**GEN, "n": 2}, headers={**headers, **ASYNC})
    assert ok.status_code == 202, ok.text  # within the limit: queued (the minute's budget is the run's)


@pytest.mark.parametrize("key", ["x" * 300, "bad\u00e9key", ""])
async def test_a_bad_idempotency_key(client: httpx.AsyncClient, key: str) -> None:
    headers = {"idempotency-key": key.encode("utf-8")}
    await assert_same_refusal(client, "/v1/images/generations", 400, "Idempotency-Key", json=GEN, headers=headers)


async def test_a_mask_that_does_not_match_the_image(client: httpx.AsyncClient) -> None:
    files = [("image", ("a.png", png(64, 64), "image/png")), ("mask", ("m.png", png(32, 32), "image/png"))]
    data = {"model": "sandbox-edit", "prompt": "x"}
    await assert_same_refusal(client, "/v1/images/edits", 400, "mask", files=files, data=data)


async def test_no_configured_provider(client: httpx.AsyncClient) -> None:
    """The synchronous call fails at once without calling anything (503 provider_not_configured);
    a job would only fail later, so it is refused the same way."""
    await assert_same_refusal(client, "/v1/images/generations", 503, None, json={**GEN, "model": "fal-only"})


async def test_validated_on_the_route_that_will_serve_it(client: httpx.AsyncClient) -> None:
    """The first route whose provider is configured (here the sandbox: fal has no key), as the
    synchronous call: a mask fal's table rejects is fine on the sandbox route."""
    files = [("image", ("a.png", png(), "image/png")), ("mask", ("m.png", png(), "image/png"))]
    data = {"model": "mixed-edit", "prompt": "x", "response_format": "b64_json"}
    sync, queued = await both(client, "/v1/images/edits", files=files, data=data)
    assert sync.status_code == 200, sync.text
    assert sync.headers["x-imagegate-provider"] == "sandbox"
    dry = await client.post("/v1/images/edits", files=files, data=data, headers={"x-imagegate-dry-run": "1"})
    assert dry.status_code == 200 and dry.json()["provider"] == "sandbox", dry.text  # what the call would send
    assert queued.status_code == 202, queued.text
    job_id = queued.json()["id"]
    for _ in range(200):
        job = (await client.get(f"/v1/images/jobs/{job_id}")).json()
        if job["status"] in ("succeeded", "failed"):
            break
        await asyncio.sleep(0.05)
    assert job["status"] == "succeeded" and job["provider"] == "sandbox", job
    image = Image.open(io.BytesIO(base64.b64decode(job["result"]["data"][0]["b64_json"])))
    assert image.size == (64, 64)
