"""The offline sandbox provider: deterministic, CPU-only, no keys, no network.

Edits apply the operations the prompt names (see `ops.VOCABULARY`); generations render a
picture from prompt + seed. Inputs travel as data URIs in the payload, exactly like a remote
provider's, so dry-runs and the parameter tables behave the same as everywhere else.
"""

from __future__ import annotations

import asyncio
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
        max_operations = self.settings.providers.sandbox.max_operations
        outputs = [
            await self.pool.run(_render, payload, None if seed is None else int(seed) + i, max_pixels, max_operations)
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


def _render(
    payload: dict[str, Any], seed: int | None, max_pixels: int, max_operations: int
) -> tuple[bytes, int, int]:
    """In the pool: one output image as (bytes, width, height), every image it makes within
    ``max_pixels`` (checked from the sizes before anything is decoded), stopping between steps if
    the job is cancelled."""
    size = payload.get("size")
    wanted = (int(size["width"]), int(size["height"])) if size else None
    prompt = str(payload["prompt"])
    if wanted is not None:
        try:
            imaging.check_pixels(wanted, max_pixels, "the requested size")
        except imaging.TooManyPixels as exc:
            raise InvalidRequest(f"The sandbox cannot make this image: {exc.reason}.", param="size") from None
    try:
        if "images" in payload:
            result = _edit(payload, prompt, max_pixels, max_operations)
            if wanted and result.size != wanted:
                imaging.checkpoint()
                result = ImageOps.fit(result, wanted, Image.Resampling.LANCZOS)  # cover, then center-crop
        else:
            result = ops.generate(prompt, seed=seed, size=wanted or _DEFAULT_SIZE, max_pixels=max_pixels)
    except ops.EditRefused as exc:
        raise InvalidRequest(str(exc), param=exc.param, code=exc.code) from None
    except imaging.TooManyPixels as exc:  # an input (checked at parse time already)
        raise InvalidRequest(f"The sandbox cannot make this image: {exc.reason}.", param="image",
                             code="image_too_large") from None
    except imaging.ImageError as exc:
        raise InvalidRequest(f"The sandbox cannot read an input image: {exc.reason}.", param="image",
                             code="invalid_image") from None
    except ValueError as exc:  # e.g. a mask without alpha
        raise InvalidRequest(f"The sandbox cannot apply this edit: {exc}", param="mask") from None
    imaging.checkpoint()
    try:
        data = imaging.encode_image(result, payload.get("output_format", "png"), payload.get("output_compression"))
    except imaging.FormatSizeLimit as exc:
        raise InvalidRequest(f"The sandbox cannot write this image: {exc.reason}.", param="output_format") from None
    return data, result.width, result.height


def _edit(payload: dict[str, Any], prompt: str, max_pixels: int, max_operations: int) -> Image.Image:
    """Plan the edit from the inputs' headers (a refusal decodes nothing), then decode and run it."""
    blobs = [decode_data_uri(uri)[0] for uri in payload["images"]]
    mask_blob = decode_data_uri(payload["mask"])[0] if payload.get("mask") else None
    infos = [imaging.probe(blob, max_pixels=max_pixels) for blob in blobs]
    mask_info = imaging.probe(mask_blob, max_pixels=max_pixels) if mask_blob is not None else None
    ops.plan_edit(
        [(info.width, info.height) for info in infos],
        prompt,
        mask_size=(mask_info.width, mask_info.height) if mask_info else None,
        max_pixels=max_pixels,
        max_operations=max_operations,
    )
    images = [imaging.decode(blob, max_pixels=max_pixels) for blob in blobs]
    mask = imaging.decode(mask_blob, max_pixels=max_pixels) if mask_blob is not None else None
    return ops.edit(images, prompt, mask=mask, max_pixels=max_pixels, max_operations=max_operations)
