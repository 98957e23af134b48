"""Post-processing the gateway does when a provider cannot: exact size, output format,
compression, opaque background, and delivery as `b64_json` or a URL (rehosted or passed through).

Never re-encode what does not need it: bytes that already have the requested format and
size go out untouched. All CPU work (decoding a `data:` URL output, probe, resize, encode, base64)
runs in the image pool.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal

import httpx

from imagegate.core import imaging, telemetry
from imagegate.core.errors import InvalidRequest, UpstreamError
from imagegate.core.request import FORMAT_MIME
from imagegate.core.results import OutputImage
from imagegate.core.sizes import Size
from imagegate.providers.base import Provider, ProviderImage
from imagegate.providers.common import decode_data_uri
from imagegate.storage.base import Storage

__all__ = ["Delivered", "OutputSpec", "deliver_image", "format_from_content_type"]

LOSSY = frozenset({"jpeg", "webp", "avif"})
_MIME_FORMAT = {mime: fmt for fmt, mime in FORMAT_MIME.items()} | {"image/jpg": "jpeg"}
_EXTENSION_FORMAT = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".gif": "gif", ".avif": "avif"}


@dataclass(slots=True)
class OutputSpec:
    """What the caller asked for, after the table decided what the provider does natively."""

    format: str  # the final format
    size: Size | None  # the exact final size, if any
    compression: int | None
    background: str | None
    response_format: Literal["url", "b64_json"]
    url_mode: Literal["rehost", "passthrough"]
    max_pixels: int
    ttl_seconds: int
    public_base_url: str


@dataclass(slots=True)
class Delivered:
    image: OutputImage
    width: int | None
    height: int | None
    format: str
    has_alpha: bool


def format_from_content_type(image: ProviderImage) -> str | None:
    """The output format the provider declared (content type, then URL extension), if any."""
    if image.content_type:
        fmt = _MIME_FORMAT.get(image.content_type.split(";")[0].strip().lower())
        if fmt:
            return fmt
    if image.url and not _is_data_url(image.url):
        path = image.url.split("?", 1)[0].lower()
        for ext, fmt in _EXTENSION_FORMAT.items():
            if path.endswith(ext):
                return fmt
    return None


def _can_pass_url(image: ProviderImage, spec: OutputSpec) -> bool:
    if spec.response_format != "url" or spec.url_mode != "passthrough" or image.url is None:
        return False
    if _is_data_url(image.url) or format_from_content_type(image) != spec.format:
        return False
    if spec.compression is not None and spec.format in LOSSY:
        return False  # the provider's own quality is unknown: re-encode to honour it
    if spec.background == "opaque":
        return False
    return spec.size is None or (image.width, image.height) == (spec.size.width, spec.size.height)


def _is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


def _finish(source: bytes | str, spec: OutputSpec) -> tuple[bytes, imaging.ImageInfo, str | None]:
    """In the pool: decode a `data:` URL (`source` as str; malformed -> UpstreamError), probe,
    transform only if needed, base64 if asked. Returns (bytes, info, b64)."""
    data = decode_data_uri(source)[0] if isinstance(source, str) else source
    info = imaging.probe(data, max_pixels=spec.max_pixels)
    size = (spec.size.width, spec.size.height) if spec.size is not None else None
    if imaging.needs_transform(
        info, size=size, fmt=spec.format, compression=spec.compression, background=spec.background
    ):
        with telemetry.postprocess("transform"):
            data, info = imaging.transform_with_info(  # no second parse of what was just encoded
                data,
                size=size,
                fmt=spec.format,
                compression=spec.compression,
                background=spec.background,
                max_pixels=spec.max_pixels,
            )
    encoded = None
    if spec.response_format == "b64_json":
        with telemetry.postprocess("base64"):
            encoded = base64.b64encode(data).decode("ascii")
    return data, info, encoded


async def deliver_image(
    image: ProviderImage,
    spec: OutputSpec,
    *,
    provider: Provider,
    storage: Storage,
    pool: imaging.ImagePool,
    revised_prompt: str | None = None,
) -> Delivered:
    """Turn one provider output into what the caller asked for: bytes, a URL to download, or a
    `data:` URL (decoded in the pool, never on the event loop; never passed through)."""
    if _can_pass_url(image, spec):
        assert image.url is not None
        return Delivered(
            OutputImage(url=image.url, revised_prompt=revised_prompt),
            image.width,
            image.height,
            spec.format,
            has_alpha=spec.background == "transparent",  # unread: what the provider was asked for
        )
    source: bytes | str
    if image.data is not None:
        source = image.data
    elif image.url is not None and _is_data_url(image.url):
        provider.check_data_uri_size(image.url)
        source = image.url
    else:
        try:
            source = await provider.fetch(image)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"Could not download the output image from {provider.name}.") from exc
    try:
        data, info, encoded = await pool.run(_finish, source, spec)
    except imaging.FormatSizeLimit as exc:  # the output exists, but not in the format asked for
        raise InvalidRequest(f"The image cannot be converted: {exc.reason}.", param="output_format") from exc
    except imaging.ImageError as exc:
        raise UpstreamError(f"The provider returned an image the gateway cannot read: {exc.reason}") from exc
    if encoded is not None:
        output = OutputImage(b64_json=encoded, revised_prompt=revised_prompt)
    else:
        with telemetry.postprocess("store"):
            image_id = await storage.put(
                data, content_type=FORMAT_MIME[info.format], extension=info.format, ttl_seconds=spec.ttl_seconds
            )
        url = await storage.url_for(image_id, ttl_seconds=spec.ttl_seconds)
        url = url or f"{spec.public_base_url}/v1/files/images/{image_id}"
        output = OutputImage(url=url, revised_prompt=revised_prompt)
    return Delivered(output, info.width, info.height, info.format, info.has_alpha)
