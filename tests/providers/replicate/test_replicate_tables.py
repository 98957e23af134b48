"""Golden payloads: OpenAI-side request in, the exact Replicate `input` out (no HTTP)."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from imagegate.core.errors import InvalidRequest, UnsupportedParameter
from imagegate.core.params import BuildContext, Mode
from imagegate.core.plan import Plan, apply_table
from imagegate.core.presets import QWEN_PRESETS
from imagegate.core.request import ImageRequest, InputImage
from imagegate.core.sizes import resolve_target
from imagegate.providers.base import Route
from imagegate.providers.replicate import ReplicateProvider
from imagegate.settings import ProvidersSettings, ReplicateSettings, Settings

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
EDIT_MODELS = ("qwen/qwen-image-edit-2511", "qwen/qwen-image-edit-plus")


def image(data: bytes = PNG, fmt: str = "png") -> InputImage:
    return InputImage(data=data, format=fmt, width=800, height=600)


@pytest.fixture
def provider() -> ReplicateProvider:
    settings = Settings(providers=ProvidersSettings(replicate=ReplicateSettings(api_token="r8_x")))
    return ReplicateProvider(httpx.AsyncClient(), settings)


async def plan(provider: ReplicateProvider, model: str, request: ImageRequest, **options: Any) -> Plan:
    route = Route("replicate", model, options=options)
    refs = await provider.prepare_images(request.images, route, dry_run=True)
    mask_ref = (await provider.prepare_images([request.mask], route, dry_run=True))[0] if request.mask else None
    target = resolve_target(
        size=request.size,
        aspect_ratio=request.aspect_ratio,
        resolution=request.resolution,
        presets=provider.size_presets(model),
    )
    ctx = BuildContext(request.operation, target=target, options=options)
    return apply_table(provider.table(model, request.operation), request, ctx, image_refs=refs, mask_ref=mask_ref)


def edit(**kw: Any) -> ImageRequest:
    kw.setdefault("images", [image()])
    return ImageRequest(operation="edit", prompt="make it blue", model="qwen-image-edit-2511", **kw)


def generate(**kw: Any) -> ImageRequest:
    return ImageRequest(operation="generate", prompt="an otter", model="qwen-image", **kw)


@pytest.mark.parametrize("model", EDIT_MODELS)
async def test_multi_image_edit_golden(provider: ReplicateProvider, model: str) -> None:
    request = edit(
        images=[image(), image()],
        n=2,
        size="1536x1024",
        output_format="jpeg",
        output_compression=80,
        seed=5,
        extra={"go_fast": "false", "disable_safety_checker": "true"},
    )
    result = await plan(provider, model, request)
    common = {
        "prompt": "make it blue",
        "image": [URI, URI],
        "aspect_ratio": "4:3",  # 1.5 is nearer 4:3 than 16:9 on a log scale
        "output_format": "jpg",
        "output_quality": 80,
        "go_fast": False,
        "disable_safety_checker": True,
    }
    assert result.payloads == [{**common, "seed": 5}, {**common, "seed": 6}]
    assert result.outcomes["n"] is Mode.EMULATED
    assert result.outcomes["size"] is Mode.CONVERTED
    assert result.outcomes["output_format"] is Mode.CONVERTED
    assert result.outcomes["output_compression"] is Mode.RENAMED


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("1024x1024", "1:1"),
        ("1792x1024", "16:9"),
        ("1024x1536", "3:4"),
        ("768x1365", "9:16"),
        ("auto", "match_input_image"),
    ],
)
async def test_edit_size_to_nearest_aspect_ratio(provider: ReplicateProvider, size: str, expected: str) -> None:
    result = await plan(provider, "qwen/qwen-image-edit-plus", edit(size=size))
    assert result.payloads == [
        {"prompt": "make it blue", "image": [URI], "aspect_ratio": expected, "output_format": "png"}
    ]


async def test_edit_without_size_sends_model_defaults_and_png(provider: ReplicateProvider) -> None:
    result = await plan(provider, "qwen/qwen-image-edit-2511", edit())
    assert result.payloads == [{"prompt": "make it blue", "image": [URI], "output_format": "png"}]
    assert result.outcomes == {}


async def test_aspect_ratio_parameter_maps_to_nearest_enum(provider: ReplicateProvider) -> None:
    result = await plan(provider, "qwen/qwen-image-edit-2511", edit(aspect_ratio="21:9", resolution="2K"))
    assert result.payloads[0]["aspect_ratio"] == "16:9"
    assert result.outcomes == {"aspect_ratio": Mode.CONVERTED, "resolution": Mode.CONVERTED}
    assert result.target is not None and (result.target.width, result.target.height) == (2730, 1536)


async def test_single_image_edit_golden(provider: ReplicateProvider) -> None:
    result = await plan(provider, "qwen/qwen-image-edit", edit(size="1024x1024", output_format="webp", seed=1))
    assert result.payloads == [{"prompt": "make it blue", "image": URI, "output_format": "webp", "seed": 1}]
    assert result.outcomes["size"] is Mode.EMULATED  # no aspect_ratio: the gateway resizes


async def test_single_image_edit_rejects_two_images(provider: ReplicateProvider) -> None:
    with pytest.raises(UnsupportedParameter) as info:
        await plan(provider, "qwen/qwen-image-edit", edit(images=[image(), image()]))
    assert (info.value.status, info.value.param) == (400, "image")


async def test_text_to_image_golden(provider: ReplicateProvider) -> None:
    request = generate(
        size="1024x1536",
        negative_prompt="blurry",
        cfg_scale=4,
        num_inference_steps=30,
        output_format="webp",
        output_compression=90,
        extra={
            "enhance_prompt": "true",
            "image_size": "optimize_for_speed",
            "strength": 0.5,
            "lora_weights": "https://example.com/l.safetensors",
            "lora_scale": "0.8",
        },
    )
    result = await plan(provider, "qwen/qwen-image", request)
    assert result.payloads == [
        {
            "prompt": "an otter",
            "aspect_ratio": "2:3",
            "negative_prompt": "blurry",
            "guidance": 4.0,
            "num_inference_steps": 30,
            "output_format": "webp",
            "output_quality": 90,
            "enhance_prompt": True,
            "image_size": "optimize_for_speed",
            "strength": 0.5,
            "lora_weights": "https://example.com/l.safetensors",
            "lora_scale": 0.8,
        }
    ]
    assert result.outcomes["cfg_scale"] is Mode.RENAMED


async def test_text_to_image_auto_size_is_not_sent(provider: ReplicateProvider) -> None:
    result = await plan(provider, "qwen/qwen-image", generate(size="auto", n=3))
    assert result.payloads == [{"prompt": "an otter", "output_format": "png"}] * 3
    assert result.images_per_call == [1, 1, 1]


@pytest.mark.parametrize(
    ("fmt", "sent", "mode"),
    [
        ("png", "png", Mode.PASSTHROUGH),
        ("webp", "webp", Mode.PASSTHROUGH),
        ("gif", "png", Mode.EMULATED),
        ("avif", "png", Mode.EMULATED),
    ],
)
async def test_output_format(provider: ReplicateProvider, fmt: str, sent: str, mode: Mode) -> None:
    result = await plan(provider, "qwen/qwen-image", generate(output_format=fmt))
    assert result.payloads[0]["output_format"] == sent
    assert result.outcomes["output_format"] is mode


@pytest.mark.parametrize(
    ("model", "request_", "param", "error"),
    [
        ("qwen/qwen-image-edit-2511", edit(negative_prompt="x"), "negative_prompt", UnsupportedParameter),
        ("qwen/qwen-image-edit-plus", edit(cfg_scale=3.0), "cfg_scale", UnsupportedParameter),
        ("qwen/qwen-image-edit", edit(num_inference_steps=20), "num_inference_steps", UnsupportedParameter),
        ("qwen/qwen-image-edit-2511", edit(mask=image()), "mask", UnsupportedParameter),
        ("qwen/qwen-image-edit-2511", edit(background="transparent"), "background", UnsupportedParameter),
        ("qwen/qwen-image-edit-2511", edit(extra={"num_outputs": 2}), "num_outputs", UnsupportedParameter),
        ("qwen/qwen-image", generate(num_inference_steps=51), "num_inference_steps", InvalidRequest),
        ("qwen/qwen-image", generate(cfg_scale=10.5), "cfg_scale", InvalidRequest),
        ("qwen/qwen-image", generate(output_compression=101), "output_compression", InvalidRequest),
        ("qwen/qwen-image", generate(extra={"image_size": "square_hd"}), "image_size", InvalidRequest),
        ("qwen/qwen-image", generate(extra={"go_fast": "maybe"}), "go_fast", InvalidRequest),
        ("qwen/qwen-image", generate(seed="x"), "seed", InvalidRequest),
        ("qwen/qwen-image", generate(output_format="bmp"), "output_format", InvalidRequest),
    ],
)
async def test_rejections_name_the_parameter(
    provider: ReplicateProvider, model: str, request_: ImageRequest, param: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        await plan(provider, model, request_)
    assert isinstance(info.value, InvalidRequest)
    assert (info.value.status, info.value.param) == (400, param)


async def test_unknown_fields_are_rejected_with_the_reason(provider: ReplicateProvider) -> None:
    with pytest.raises(UnsupportedParameter) as info:
        await plan(provider, "qwen/qwen-image", generate(extra={"num_outputs": 2}))
    assert info.value.code == "unknown_parameter"
    assert "Replicate validates input against the model schema" in info.value.message


async def test_ignored_parameters_are_noted_not_sent(provider: ReplicateProvider) -> None:
    request = edit(
        quality="high",
        style="vivid",
        moderation="low",
        input_fidelity="high",
        user="u-1",
        background="opaque",
        extra={"acceleration": "high", "enable_safety_checker": False, "sync_mode": True},
    )
    result = await plan(provider, "qwen/qwen-image-edit-2511", request)
    assert result.payloads == [{"prompt": "make it blue", "image": [URI], "output_format": "png"}]
    assert result.notes["acceleration"] == "fal-only option"
    assert set(result.notes) == {
        "quality",
        "style",
        "moderation",
        "input_fidelity",
        "user",
        "acceleration",
        "enable_safety_checker",
        "sync_mode",
    }
    assert result.outcomes["background"] is Mode.EMULATED


def test_catalogue(provider: ReplicateProvider) -> None:
    assert set(provider.models()) == {
        "qwen/qwen-image-edit-2511",
        "qwen/qwen-image-edit-plus",
        "qwen/qwen-image-edit",
        "qwen/qwen-image",
    }
    assert provider.size_presets("qwen/qwen-image") is QWEN_PRESETS
    with pytest.raises(KeyError):
        provider.table("qwen/qwen-image", "edit")
    with pytest.raises(KeyError):
        provider.table("qwen/qwen-image-edit-2511", "generate")


async def test_prepare_images_inline_placeholder_and_url(provider: ReplicateProvider) -> None:
    big = image(PNG + b"\x00" * 300_000)
    remote = InputImage(url="https://example.com/cat.png")
    refs = await provider.prepare_images(
        [image(), big, remote], Route("replicate", "qwen/qwen-image-edit-2511"), dry_run=True
    )
    assert refs[0] == URI
    assert refs[1] == f"<upload via POST /files: image-1.png, image/png, {len(big.data or b'')} bytes>"
    assert refs[2] == "https://example.com/cat.png"


async def test_route_option_overrides_inline_limit(provider: ReplicateProvider) -> None:
    route = Route("replicate", "qwen/qwen-image-edit-2511", options={"inline_max_bytes": 10})
    (ref,) = await provider.prepare_images([image()], route, dry_run=True)
    assert ref.startswith("<upload via POST /files: image-0.png")
