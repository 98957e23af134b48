"""The offline sandbox provider: deterministic, CPU-only, no keys, no network.

Edits apply the operations the prompt names (see `ops.VOCABULARY`); generations render a
picture from prompt + seed. Inputs travel as data URIs in the payload, exactly like a remote
provider's, so dry-runs and the parameter tables behave the same as everywhere else.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from typing import Any

import httpx
from PIL import Image, ImageOps

from imagegate.core import imaging
from imagegate.core.errors import InvalidRequest
from imagegate.core.params import ParamTable
from imagegate.core.presets import QWEN_PRESETS
from imagegate.core.request import FORMAT_MIME, InputImage, Operation
from imagegate.core.sizes import SizePresets
from imagegate.providers.base import CallContext, Provider, ProviderImage, ProviderResult, Route
from imagegate.providers.common import decode_data_uri
from imagegate.providers.sandbox import ops
from imagegate.providers.sandbox.tables import MODELS

__all__ = ["SandboxProvider"]

_DEFAULT_SIZE = (1024, 1024)


class SandboxProvider(Provider):
    name = "sandbox"
    accepts_image_urls = False

    def __init__(self, http: httpx.AsyncClient, settings: Any, *, pool: imaging.ImagePool) -> None:
        super().__init__(http, settings)
        self.pool = pool

    def check_configured(self) -> None:
        return None  # always available

    def models(self) -> Sequence[str]:
        return tuple(MODELS)

    def table(self, model: str, operation: Operation) -> ParamTable:
        return MODELS[model][operation]

    def size_presets(self, model: str) -> SizePresets:
        return QWEN_PRESETS

    async def prepare_images(self, images: Sequence[InputImage], route: Route, *, dry_run: bool = False) -> list[str]:
        return [await self.pool.run(image.data_uri) for image in images]  # base64 of large inputs: off the loop

    async def run(self, payload: dict[str, Any], route: Route, ctx: CallContext) -> ProviderResult:
        delay = self.settings.providers.sandbox.delay_seconds
        if delay:
            await asyncio.sleep(delay)
        count = int(payload.get("num_images", 1))
        seed = payload.get("seed")
        max_pixels = self.settings.limits.max_pixels
        outputs = [
            await self.pool.run(_render, payload, None if seed is None else int(seed) + i, max_pixels)
            for i in range(count)
        ]
        fmt = payload.get("output_format", "png")
        return ProviderResult(
            images=[
                ProviderImage(data=data, content_type=FORMAT_MIME[fmt], width=width, height=height)
                for data, width, height in outputs
            ],
            request_id=f"sandbox-{ctx.request_id}",
            seed=None if seed is None else int(seed),
        )


def _decode(uri: str, max_pixels: int) -> Image.Image:
    data, _ = decode_data_uri(uri)
    imaging.probe(data, max_pixels=max_pixels)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _render(payload: dict[str, Any], seed: int | None, max_pixels: int) -> tuple[bytes, int, int]:
    """In the pool: one output image as (bytes, width, height)."""
    size = payload.get("size")
    wanted = (int(size["width"]), int(size["height"])) if size else None
    prompt = str(payload["prompt"])
    if "images" in payload:
        try:
            images = [_decode(uri, max_pixels) for uri in payload["images"]]
            mask = _decode(payload["mask"], max_pixels) if payload.get("mask") else None
            result = ops.edit(images, prompt, mask=mask)
        except ValueError as exc:  # e.g. a mask without alpha
            raise InvalidRequest(f"The sandbox cannot apply this edit: {exc}", param="mask") from exc
        if wanted and result.size != wanted:
            result = ImageOps.fit(result, wanted, Image.Resampling.LANCZOS)  # cover, then center-crop
    else:
        result = ops.generate(prompt, seed=seed, size=wanted or _DEFAULT_SIZE)
    data = imaging.encode_image(result, payload.get("output_format", "png"), payload.get("output_compression"))
    return data, result.width, result.height
