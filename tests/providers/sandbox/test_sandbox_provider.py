from __future__ import annotations

import io
import time

import httpx
import pytest
from PIL import Image

from imagegate.core.errors import UnsupportedParameter
from imagegate.core.imaging import ImagePool
from imagegate.core.params import BuildContext, Mode
from imagegate.core.plan import apply_table
from imagegate.core.presets import QWEN_PRESETS
from imagegate.core.request import ImageRequest, InputImage
from imagegate.core.sizes import resolve_target
from imagegate.providers.base import CallContext, Route
from imagegate.providers.sandbox.provider import SandboxProvider
from imagegate.settings import Settings


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> InputImage:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return InputImage(data=out.getvalue(), format="png", width=size[0], height=size[1])


EDIT_ROUTE = Route("sandbox", "sandbox-edit")


@pytest.fixture
def provider() -> SandboxProvider:
    return SandboxProvider(httpx.AsyncClient(), Settings(), pool=ImagePool(2))


async def plan(provider: SandboxProvider, req: ImageRequest) -> list[dict[str, object]]:
    model = "sandbox-edit" if req.operation == "edit" else "sandbox-image"
    route = Route("sandbox", model)
    refs = await provider.prepare_images(req.images, route)
    target = resolve_target(size=req.size, aspect_ratio=req.aspect_ratio, resolution=req.resolution,
                            presets=QWEN_PRESETS)
    return apply_table(provider.table(model, req.operation), req, BuildContext(req.operation, target=target),
                       image_refs=refs).payloads


async def test_edit_applies_vocabulary_at_requested_size(provider: SandboxProvider) -> None:
    req = ImageRequest(operation="edit", prompt="grayscale please", model="sandbox-edit",
                       images=[png((200, 30, 30))], aspect_ratio="1:1", resolution="0.25")
    (payload,) = await plan(provider, req)
    result = await provider.run(payload, EDIT_ROUTE, CallContext("r", time.monotonic() + 5, "edit"))
    image = Image.open(io.BytesIO(result.images[0].data or b""))
    assert image.size == (512, 512) and image.format == "PNG"
    r, g, b = image.convert("RGB").getpixel((256, 256))
    assert r == g == b


async def test_multiple_images_side_by_side(provider: SandboxProvider) -> None:
    req = ImageRequest(operation="edit", prompt="invert", model="sandbox-edit",
                       images=[png((0, 0, 0)), png((255, 255, 255))])
    (payload,) = await plan(provider, req)
    result = await provider.run(payload, EDIT_ROUTE, CallContext("r", time.monotonic() + 5, "edit"))
    image = Image.open(io.BytesIO(result.images[0].data or b"")).convert("RGB")
    assert image.size == (80, 30)
    assert image.getpixel((5, 5)) == (255, 255, 255) and image.getpixel((75, 5)) == (0, 0, 0)


async def test_generate_is_deterministic_and_seeded(provider: SandboxProvider) -> None:
    async def render(seed: int) -> bytes:
        req = ImageRequest(operation="generate", prompt="a lighthouse", model="sandbox-image", seed=seed,
                           size="300x200", output_format="webp")
        (payload,) = await plan(provider, req)
        result = await provider.run(payload, Route("sandbox", "sandbox-image"),
                                    CallContext("r", time.monotonic() + 5, "generate"))
        return result.images[0].data or b""

    first, again, other = await render(1), await render(1), await render(2)
    assert first == again and first != other
    image = Image.open(io.BytesIO(first))
    assert image.size == (300, 200) and image.format == "WEBP"


async def test_table_reports_and_rejects(provider: SandboxProvider) -> None:
    table = provider.table("sandbox-image", "generate")
    assert table.rules_for("negative_prompt")[0].mode is Mode.IGNORED
    req = ImageRequest(operation="generate", prompt="p", model="sandbox-image", background="transparent")
    with pytest.raises(UnsupportedParameter) as info:
        await plan(provider, req)
    assert info.value.param == "background"
    with pytest.raises(KeyError):
        provider.table("sandbox-image", "edit")
