"""GET /v1/models[/{id}], GET /v1/files/images/{id}, /healthz and /readyz."""

from __future__ import annotations

import shutil
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from imagegate.core.catalog import Catalog
from imagegate.storage.base import Storage, StoredImage
from imagegate.storage.local import LocalStorage

# -- models ----------------------------------------------------------------------------------------


async def test_models_list_in_openai_shape(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} == {"sandbox-edit", "sandbox-image"}
    for model in body["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert model["object"] == "model" and isinstance(model["created"], int)


async def test_models_through_the_sdk(sdk: openai.AsyncOpenAI) -> None:
    ids = [model.id async for model in sdk.models.list()]
    assert sorted(ids) == ["sandbox-edit", "sandbox-image"]
    model = await sdk.models.retrieve("sandbox-edit")
    assert (model.id, model.object, model.owned_by) == ("sandbox-edit", "model", "imagegate")
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found" and "no-such-model" in info.value.message


async def test_model_ids_with_slashes(app: FastAPI, client: httpx.AsyncClient) -> None:
    app.state.catalog = Catalog.from_config({"fal/qwen": app.state.settings.models["sandbox-edit"].model_copy()})
    response = await client.get("/v1/models/fal/qwen")
    assert response.status_code == 200 and response.json()["id"] == "fal/qwen"
    missing = await client.get("/v1/models/fal/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


# -- files -----------------------------------------------------------------------------------------


async def test_stored_image_is_served_with_type_and_cache_control(app: FastAPI, client: httpx.AsyncClient) -> None:
    storage: LocalStorage = app.state.storage
    image_id = await storage.put(b"\xff\xd8jpeg", content_type="image/jpeg", extension="jpeg", ttl_seconds=600)
    response = await client.get(f"/v1/files/images/{image_id}")
    assert response.status_code == 200
    assert response.content == b"\xff\xd8jpeg"
    assert response.headers["content-type"] == "image/jpeg"
    directive, max_age = response.headers["cache-control"].split(", ")
    assert directive == "private" and 595 <= int(max_age.removeprefix("max-age=")) <= 600
    assert response.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize("image_id", ["nope.png", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "A" * 32 + ".png"])
async def test_unknown_or_malformed_ids_are_404(client: httpx.AsyncClient, image_id: str) -> None:
    response = await client.get(f"/v1/files/images/{image_id}")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_expired_image_is_404(app: FastAPI, client: httpx.AsyncClient) -> None:
    now = [1_000.0]
    storage = LocalStorage(app.state.settings.storage.path, clock=lambda: now[0])
    app.state.storage = storage
    image_id = await storage.put(b"png", content_type="image/png", extension="png", ttl_seconds=10)
    assert (await client.get(f"/v1/files/images/{image_id}")).status_code == 200
    now[0] += 11
    response = await client.get(f"/v1/files/images/{image_id}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


# -- health ----------------------------------------------------------------------------------------


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_readyz_ready(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200 and response.json() == {"status": "ready", "models": 2}


async def test_readyz_without_models_is_503(app: FastAPI, client: httpx.AsyncClient) -> None:
    app.state.catalog = Catalog({})
    response = await client.get("/readyz")
    assert response.status_code == 503
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "no models" in error["message"]


async def test_readyz_with_unwritable_local_storage_is_503(app: FastAPI, client: httpx.AsyncClient) -> None:
    storage: LocalStorage = app.state.storage
    shutil.rmtree(storage.root)
    storage.root.parent.mkdir(parents=True, exist_ok=True)
    storage.root.write_bytes(b"a file where the directory should be")
    response = await client.get("/readyz")
    assert response.status_code == 503 and "storage" in response.json()["error"]["message"]


class PlainStorage(Storage):
    """A storage without a ready() hook: readiness is a put/get round trip."""

    def __init__(self, broken: bool) -> None:
        self.broken = broken
        self.items: dict[str, StoredImage] = {}

    async def put(self, data: bytes, *, content_type: str, extension: str, ttl_seconds: int) -> str:
        if self.broken:
            raise OSError("read-only file system")
        self.items[f"id.{extension}"] = StoredImage(data, content_type, 0.0)
        return f"id.{extension}"

    async def get(self, image_id: str) -> StoredImage | None:
        return self.items.get(image_id)


@pytest.mark.parametrize(("broken", "status"), [(False, 200), (True, 503)])
async def test_readyz_with_a_storage_without_a_ready_hook(
    app: FastAPI, client: httpx.AsyncClient, broken: bool, status: int
) -> None:
    storage: Any = PlainStorage(broken)
    app.state.storage = storage
    assert (await client.get("/readyz")).status_code == status
