"""Small real test images as bytes (Pillow), plus data-URI helpers shared by the fakes."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
from PIL import Image

Color = tuple[int, ...]

# Output-format names used by the upstreams -> (Pillow format, MIME type, file extension).
FORMATS: dict[str, tuple[str, str, str]] = {
    "png": ("PNG", "image/png", "png"),
    "jpeg": ("JPEG", "image/jpeg", "jpeg"),
    "jpg": ("JPEG", "image/jpeg", "jpg"),
    "webp": ("WEBP", "image/webp", "webp"),
}


def image_bytes(
    fmt: str, w: int = 64, h: int = 64, color: Color = (200, 40, 40), mode: str = "RGB", **save: object
) -> bytes:
    """Encode a solid-colour ``w``x``h`` image as ``fmt`` (``png``/``jpeg``/``jpg``/``webp``)."""
    pil_format = FORMATS[fmt.lower()][0]
    if pil_format == "JPEG" and mode not in ("RGB", "L", "CMYK"):
        mode = "RGB"
    img = Image.new(mode, (w, h), _fit_color(color, mode))
    buf = io.BytesIO()
    img.save(buf, format=pil_format, **save)
    return buf.getvalue()


def png_bytes(w: int = 64, h: int = 64, color: Color = (200, 40, 40), mode: str = "RGB") -> bytes:
    return image_bytes("png", w, h, color, mode)


def jpeg_bytes(w: int = 64, h: int = 64, color: Color = (40, 160, 40), quality: int = 90) -> bytes:
    return image_bytes("jpeg", w, h, color, "RGB", quality=quality)


def webp_bytes(w: int = 64, h: int = 64, color: Color = (40, 40, 200), mode: str = "RGB") -> bytes:
    return image_bytes("webp", w, h, color, mode)


def mime_for(fmt: str) -> str:
    return FORMATS[fmt.lower()][1]


def ext_for(fmt: str) -> str:
    return FORMATS[fmt.lower()][2]


def data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def parse_data_uri(uri: str) -> tuple[str, bytes] | None:
    """``data:<mime>;base64,<b64>`` -> (mime, bytes); None if not a base64 data URI."""
    if not uri.startswith("data:") or "," not in uri:
        return None
    header, _, payload = uri[5:].partition(",")
    parts = header.split(";")
    if "base64" not in parts[1:]:
        return None
    try:
        return parts[0] or "application/octet-stream", base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of encoded image bytes, or None if Pillow cannot decode them."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:
        return None


def image_info(data: bytes) -> tuple[str, int, int]:
    """(Pillow format, width, height) of encoded image bytes; raises if undecodable."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return str(img.format), img.width, img.height


def color_for(seed: int) -> tuple[int, int, int]:
    """A deterministic, seed-dependent colour so different outputs differ."""
    return (seed * 67 % 256, seed * 131 % 256, seed * 197 % 256)


def _fit_color(color: Color, mode: str) -> Color | int:
    bands = len(Image.new(mode, (1, 1)).getbands())
    if bands == 1:
        return color[0]
    if len(color) >= bands:
        return tuple(color[:bands])
    return tuple(color) + (255,) * (bands - len(color))


async def load_image_bytes(url: str, lookup: Callable[[str], bytes | None] | None = None) -> bytes | None:
    """Best-effort fetch of an input image the way a fake "runner" would.

    ``data:`` URIs are decoded; ``lookup(url)`` may resolve files the fake itself hosts; other URLs are
    fetched only when they point at 127.0.0.1/localhost (never the real network). None if unavailable.
    """
    if not isinstance(url, str):
        return None
    parsed = parse_data_uri(url)
    if parsed is not None:
        return parsed[1]
    if lookup is not None and (found := lookup(url)) is not None:
        return found
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            resp = await client.get(url)
    except httpx.HTTPError:
        return None
    return resp.content if resp.status_code == 200 else None
