"""The official openai SDK against the gateway (in-process), on the offline sandbox models.
Every image is decoded and checked for its exact pixel size and format."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from tests.fakes.images import jpeg_bytes, png_bytes, webp_bytes

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}


async def decode(client: httpx.AsyncClient, item: Any) -> Image.Image:
    if item.b64_json:
        data = base64.b64decode(item.b64_json)
    else:
        assert item.url and "/v1/files/images/" in item.url
        response = await client.get(item.url)
        assert response.status_code == 200
        data = response.content
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


async def test_edit_single_image_file_object(sdk: openai.AsyncOpenAI, client: httpx.AsyncClient) -> None:
    photo = io.BytesIO(png_bytes(200, 100))
    photo.name = "photo.png"
    result = await sdk.images.edit(model="sandbox-edit", image=photo, prompt="grayscale", size="256x128",
                                   response_format="b64_json")
    image = await decode(client, result.data[0])
    assert image.size == (256, 128) and image.format == "PNG"
    r, g, b = image.convert("RGB").getpixel((100, 60))
    assert r == g == b
    assert result.size == "256x128" and result.output_format == "png" and result.background == "opaque"


async def test_edit_list_of_three_raw_bytes_and_tuple(sdk: openai.AsyncOpenAI, client: httpx.AsyncClient) -> None:
    images: list[Any] = [png_bytes(64, 64), ("b.jpg", jpeg_bytes(64, 64)), ("c.webp", webp_bytes(64, 64), "image/webp")]
    result = await sdk.images.edit(model="sandbox-edit", image=images, prompt="invert", response_format="b64_json")
    image = await decode(client, result.data[0])
    assert image.size == (192, 64)  # three inputs side by side


async def test_edit_raw_bytes_alone(sdk: openai.AsyncOpenAI, client: httpx.AsyncClient) -> None:
    result = await sdk.images.edit(model="sandbox-edit", image=jpeg_bytes(80, 60), prompt="mirror",
                                   response_format="b64_json")
    assert (await decode(client, result.data[0])).size == (80, 60)


@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_each_output_format(sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, fmt: str) -> None:
    result = await sdk.images.edit(model="sandbox-edit", image=("a.png", png_bytes(64, 48)), prompt="sepia",
                                   output_format=fmt, response_format="b64_json")  # type: ignore[arg-type]
    image = await decode(client, result.data[0])
    assert image.format == FORMATS[fmt] and image.size == (64, 48)
    assert result.output_format == fmt


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
async def test_each_response_format(sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, response_format: str) -> None:
    result = await sdk.images.generate(model="sandbox-image", prompt="a boat", size="320x240",
                                       response_format=response_format)  # type: ignore[arg-type]
    item = result.data[0]
    assert (item.url is not None) == (response_format == "url")
    assert (item.b64_json is not None) == (response_format == "b64_json")
    assert (await decode(client, item)).size == (320, 240)


@pytest.mark.parametrize("n", [1, 3, 10])  # 10: three sandbox calls (4 + 4 + 2)
async def test_n(sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, n: int) -> None:
    result = await sdk.images.generate(model="sandbox-image", prompt="stars", n=n, size="64x64", extra_body={"seed": 3},
                                       response_format="b64_json")
    assert len(result.data) == n
    decoded = [await decode(client, item) for item in result.data]
    assert all(image.size == (64, 64) for image in decoded)
    assert len({image.tobytes() for image in decoded}) == n  # distinct seeds, distinct pictures


@pytest.mark.parametrize(
    ("size", "expected"), [("640x360", (640, 360)), ("16:9", (1365, 768)), ("auto", (96, 64))]
)
async def test_size_forms_on_edits(sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, size: str,
                                   expected: tuple[int, int]) -> None:
    result = await sdk.images.edit(model="sandbox-edit", image=("a.png", png_bytes(96, 64)), prompt="blur",
                                   size=size, response_format="b64_json")  # type: ignore[arg-type]
    assert (await decode(client, result.data[0])).size == expected


async def test_aspect_ratio_and_resolution(sdk: openai.AsyncOpenAI, client: httpx.AsyncClient) -> None:
    raw = await sdk.images.with_raw_response.generate(
        model="sandbox-image", prompt="a hill", response_format="b64_json",
        extra_body={"aspect_ratio": "1:1", "resolution": "1K"},
    )
    result = raw.parse()
    assert (await decode(client, result.data[0])).size == (1024, 1024)
    assert raw.headers["x-imagegate-params"] == "response_format=emulated; aspect_ratio=converted; resolution=converted"
    assert raw.headers["x-imagegate-provider"] == "sandbox"
    assert raw.headers["x-request-id"]


async def test_dry_run_returns_exact_payload(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/images/generations",
        json={"model": "sandbox-image", "prompt": "p", "n": 6, "seed": 10, "size": "1:1", "output_format": "avif"},
        headers={"x-imagegate-dry-run": "1"},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["payloads"] == [
        {"prompt": "p", "size": {"width": 1024, "height": 1024}, "seed": 10, "output_format": "png", "num_images": 4},
        {"prompt": "p", "size": {"width": 1024, "height": 1024}, "seed": 14, "output_format": "png", "num_images": 2},
    ]
    assert body["params"] == {"size": "converted", "output_format": "emulated", "seed": "passthrough", "n": "emulated"}


async def test_streaming_through_the_sdk(sdk: openai.AsyncOpenAI, client: httpx.AsyncClient) -> None:
    stream = await sdk.images.edit(model="sandbox-edit", image=("a.png", png_bytes(32, 32)), prompt="invert",
                                   stream=True)
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_edit.completed"]
    image = Image.open(io.BytesIO(base64.b64decode(events[0].b64_json)))
    assert image.size == (32, 32)


async def test_models_list_and_get(sdk: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in sdk.models.list()]
    assert {"sandbox-edit", "sandbox-image", "qwen-image-edit-2511"} <= set(ids)
    assert (await sdk.models.retrieve("sandbox-edit")).id == "sandbox-edit"
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.models.retrieve("nope")
    assert info.value.code == "model_not_found"


async def test_qwen_without_keys_is_a_clear_error_and_sandbox_still_works(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await sdk.images.edit(model="qwen-image-edit-2511", image=("a.png", png_bytes(32, 32)), prompt="x")
    assert info.value.status_code == 503 and info.value.code == "provider_not_configured"
    assert "set FAL_KEY" in info.value.message and "set REPLICATE_API_TOKEN" in info.value.message
    assert info.value.response.headers["x-should-retry"] == "false"  # the SDK does not retry it in vain
    ok = await sdk.images.edit(model="sandbox-edit", image=("a.png", png_bytes(32, 32)), prompt="x",
                               response_format="b64_json")
    assert ok.data and ok.data[0].b64_json


async def test_streamed_response_names_provider_and_params(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/images/generations", json={
        "model": "sandbox-image", "prompt": "p", "stream": True, "size": "32x32", "output_format": "gif"})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-imagegate-provider"] == "sandbox"
    assert response.headers["x-imagegate-params"] == (
        "response_format=emulated; output_format=emulated; stream=emulated; size=converted"
    )
