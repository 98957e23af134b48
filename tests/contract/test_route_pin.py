"""The route pin (`x-imagegate-route`) through the official SDK: a pinned request is served by
that route, a dry run lists the model's routes, an unknown route is a BadRequestError naming it."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from tests.conftest import gateway_settings
from tests.fakes.images import png_bytes

from imagegate.settings import Settings

TWO_ROUTES = [{"provider": "sandbox", "model": "sandbox-edit"}, {"provider": "sandbox", "model": "sandbox-edit"}]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return gateway_settings(
        tmp_path,
        models={
            "sandbox-edit": {"routes": TWO_ROUTES},
            "qwen-image-edit-2511": {
                "routes": [
                    {"provider": "fal", "model": "fal-ai/qwen-image-edit-2511"},
                    {"provider": "replicate", "model": "qwen/qwen-image-edit-2511"},
                ]
            },
        },
    )


async def test_a_pinned_edit_is_served_by_that_route(sdk: openai.AsyncOpenAI) -> None:
    raw = await sdk.images.with_raw_response.edit(
        model="sandbox-edit", image=("a.png", png_bytes(32, 16)), prompt="grayscale", size="64x32",
        response_format="b64_json", extra_headers={"x-imagegate-route": "1"},
    )
    assert raw.headers["x-imagegate-provider"] == "sandbox"
    assert raw.parse().size == "64x32"


async def test_a_dry_run_lists_the_routes_and_honours_the_pin(sdk: openai.AsyncOpenAI) -> None:
    raw = await sdk.images.with_raw_response.edit(
        model="qwen-image-edit-2511", image=("a.png", png_bytes(8, 8)), prompt="x",
        extra_headers={"x-imagegate-dry-run": "1", "x-imagegate-route": "replicate"},
    )
    body = raw.http_response.json()
    assert body["provider"] == "replicate" and body["upstream_model"] == "qwen/qwen-image-edit-2511"
    assert body["routes"] == [
        {"provider": "fal", "upstream_model": "fal-ai/qwen-image-edit-2511"},
        {"provider": "replicate", "upstream_model": "qwen/qwen-image-edit-2511"},
    ]


@pytest.mark.parametrize("pin", ["2", "openai", "sandbox:other", "x" * 5000])
async def test_an_unknown_route_is_a_bad_request(sdk: openai.AsyncOpenAI, pin: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.images.edit(
            model="sandbox-edit", image=("a.png", png_bytes(8, 8)), prompt="x", extra_headers={"x-imagegate-route": pin}
        )
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "x-imagegate-route"
    assert "its routes are 0 (sandbox:sandbox-edit), 1 (sandbox:sandbox-edit)" in error["message"]
