"""The OpenAI-compatible upstream adapter against a real OpenAI-compatible server: a second
imagegate (sandbox models) under uvicorn, reached through the first one."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from PIL import Image
from tests.conftest import gateway_settings
from tests.fakes.images import png_bytes
from tests.fakes.server import LocalServer

from imagegate.app import create_app


@pytest.fixture
def front(tmp_path: Path) -> Iterator[str]:
    back_app = create_app(gateway_settings(tmp_path / "back"))
    with LocalServer(back_app) as back:
        settings = gateway_settings(
            tmp_path / "front",
            models={
                "remote-edit": {"routes": [{"provider": "openai", "model": "sandbox-edit"}]},
                "remote-image": {"routes": [{"provider": "openai", "model": "sandbox-image"}]},
            },
            providers={"openai": {"api_key": "upstream-key", "base_url": back.url + "/v1"}},
        )
        with LocalServer(create_app(settings)) as srv:
            yield srv.url


def test_edit_through_another_imagegate(front: str) -> None:
    client = openai.OpenAI(base_url=front + "/v1", api_key="unused", max_retries=0)
    raw = client.images.with_raw_response.edit(
        model="remote-edit", image=[png_bytes(40, 30), ("b.png", png_bytes(40, 30))], prompt="grayscale",
        size="64x48", output_format="webp", response_format="b64_json",
    )
    image = Image.open(io.BytesIO(base64.b64decode(raw.parse().data[0].b64_json or "")))
    assert image.size == (64, 48) and image.format == "WEBP"
    assert raw.headers["x-imagegate-provider"] == "openai"
    assert raw.headers["x-imagegate-params"] == "response_format=emulated; output_format=passthrough; size=converted"


def test_generation_errors_pass_through_with_their_param(front: str) -> None:
    client = openai.OpenAI(base_url=front + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="remote-image", prompt="a kite", n=2, size="80x60",
                                    response_format="b64_json")
    assert [Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))).size for d in result.data] == [(80, 60)] * 2
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="remote-image", prompt="x", extra_body={"background": "transparent"})
    assert info.value.param == "background"
