"""The gateway on S3 storage, against a real S3-compatible server (moto) on 127.0.0.1, driven
through the official OpenAI SDK: edit -> URL -> download -> the same image, both URL styles,
expiry, and /readyz following the bucket."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI
from tests.conftest import gateway_settings
from tests.fakes.images import image_info, png_bytes
from tests.fakes.s3 import LocalS3

from imagegate.app import create_app
from imagegate.storage.s3 import S3Storage


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with LocalS3() as server:
        yield server


@pytest.fixture
async def make_app(tmp_path: Path) -> AsyncIterator[Any]:
    async with contextlib.AsyncExitStack() as stack:

        async def build(storage: dict[str, Any]) -> FastAPI:
            app = create_app(gateway_settings(tmp_path, storage=storage))
            await stack.enter_async_context(app.router.lifespan_context(app))
            return app

        yield build


def sdk_for(app: FastAPI) -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway")
    return openai.AsyncOpenAI(api_key="unused", base_url="http://gateway/v1", http_client=http, max_retries=0)


async def edit(sdk: openai.AsyncOpenAI, response_format: str) -> Any:
    return await sdk.images.edit(
        model="sandbox-edit",
        image=("in.png", png_bytes(48, 32)),
        prompt="grayscale, then rotate 90 degrees",
        response_format=response_format,  # type: ignore[arg-type]
    )


async def test_presigned_round_trip_returns_the_same_image(s3: LocalS3, make_app: Any) -> None:
    bucket = s3.create_bucket()
    app = await make_app(s3.storage_settings(bucket, url_style="presigned"))
    assert isinstance(app.state.storage, S3Storage)
    sdk = sdk_for(app)
    by_url = await edit(sdk, "url")
    url = by_url.data[0].url
    assert url.startswith(f"{s3.url}/{bucket}/outputs/") and "X-Amz-Signature=" in url
    assert "X-Amz-Expires=3600" in url
    async with httpx.AsyncClient() as http:
        downloaded = await http.get(url)  # straight from the bucket, not through the gateway
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"
    inline = await edit(sdk, "b64_json")
    assert downloaded.content == base64.b64decode(inline.data[0].b64_json)
    assert image_info(downloaded.content) == ("PNG", 32, 48)  # rotated
    assert len(s3.client().list_objects_v2(Bucket=bucket, Prefix="outputs/")["Contents"]) == 1


async def test_gateway_style_serves_from_the_bucket_until_expiry(s3: LocalS3, make_app: Any) -> None:
    bucket = s3.create_bucket()
    app = await make_app({**s3.storage_settings(bucket, url_style="gateway"), "ttl_seconds": 1})
    sdk = sdk_for(app)
    result = await edit(sdk, "url")
    url = result.data[0].url
    assert url.startswith("http://gateway/v1/files/images/") and url.endswith(".png")
    image_id = url.rsplit("/", 1)[1]
    assert s3.client().head_object(Bucket=bucket, Key=f"outputs/{image_id}")["ContentType"] == "image/png"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        served = await client.get(url)
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert image_info(served.content) == ("PNG", 32, 48)
        await asyncio.sleep(1.1)
        expired = await client.get(url)
    assert expired.status_code == 404
    assert expired.json()["error"]["param"] == "image_id"


async def test_readyz_and_requests_follow_the_bucket(make_app: Any) -> None:
    server = LocalS3().start()
    try:
        app = await make_app(server.storage_settings(server.create_bucket()))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            server.stop()
            await asyncio.sleep(1.05)  # a successful probe stands for a second
            not_ready = await client.get("/readyz")
            edit_response = await client.post(
                "/v1/images/edits",
                data={"model": "sandbox-edit", "prompt": "grayscale", "response_format": "url"},
                files={"image": ("a.png", png_bytes(16, 16), "image/png")},
            )
            file_response = await client.get("/v1/files/images/" + "A" * 32 + ".png")
    finally:
        server.stop()
    assert not_ready.status_code == 503
    error = not_ready.json()["error"]
    assert error["code"] == "not_ready" and "storage" in error["message"]
    for response in (edit_response, file_response):  # a clean 503, never a 500 with a traceback
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "storage_unavailable"
        assert "127.0.0.1" not in response.text


async def test_readyz_fails_for_a_missing_bucket(s3: LocalS3, make_app: Any) -> None:
    app = await make_app(s3.storage_settings("imagegate-no-such-bucket"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        response = await client.get("/readyz")
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"


async def test_a_stopped_s3_server_is_a_clean_503_not_a_500(make_app: Any) -> None:
    """S3 going away: storing a new image and serving a stored one are 503 `storage_unavailable`
    in OpenAI's envelope (never a 500 with a traceback), and the SDK sees InternalServerError."""
    server = LocalS3().start()
    try:
        app = await make_app(server.storage_settings(server.create_bucket(), url_style="gateway"))
        sdk = sdk_for(app)
        stored = await edit(sdk, "url")
        path = str(stored.data[0].url).removeprefix("http://gateway")
        server.stop()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            served = await client.get(path)
            made = await client.post(
                "/v1/images/generations", json={"model": "sandbox-image", "prompt": "x", "size": "64x64"}
            )
        with pytest.raises(openai.InternalServerError) as raised:
            await edit(sdk, "url")
    finally:
        server.stop()
    for response in (served, made):
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "storage_unavailable"
        assert response.json()["error"]["type"] == "server_error"
    assert served.headers["retry-after"] == "1"
    assert raised.value.status_code == 503
