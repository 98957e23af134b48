"""Encoding a decoded image in an output format, with the gateway's speed-oriented settings.

:func:`encode_image` is re-exported by :mod:`imagegate.core.imaging` (its public import path);
the private helpers here are shared with :func:`imagegate.core.imaging.transform_with_info`.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from imagegate.core.image_errors import FormatSizeLimit, ImageError

__all__ = ["OUTPUT_FORMATS", "encode_image"]

#: Formats :func:`transform` and :func:`encode_image` can write.
OUTPUT_FORMATS = frozenset({"png", "jpeg", "webp", "gif", "avif"})
_LOSSY_FORMATS = frozenset({"jpeg", "webp", "avif"})
_BACKGROUNDS = frozenset({"opaque", "transparent", "auto"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255)

# Encoder settings, chosen for latency. Measured on a 1024x1024 RGB image (2 cores, Pillow 13):
#   PNG   compress_level default(6) 319-446 ms   level 1: 70-88 ms (files ~15% larger)
#   AVIF  speed default(6) 140-598 ms            speed 8: 43-60 ms (similar size at quality 80)
#   WebP  method 0..6 at quality 90, smooth image: 17, 25, 32, 66, 65, 69, 77 ms
#         (35.7, 34.7, 35.0, 32.9, 33.0, 29.4, 28.2 kB); on a noisy image 59..535 ms, sizes
#         within 4% of each other. method=2 is the knee: 2-2.5x faster than 4, files ~6% larger.
#   JPEG  quality 90, optimize=False: 2-5 ms.
#   GIF   Pillow's default RGB->P (median cut) 255 ms; FASTOCTREE quantize: 9 ms + 9 ms save.
_PNG_COMPRESS_LEVEL = 1
_AVIF_SPEED = 8
_WEBP_METHOD = 2
_DEFAULT_QUALITY = {"jpeg": 90, "webp": 90, "avif": 80}
# The largest side each encoder can write (measured with Pillow 13: beyond it the encoders raise
# ValueError, OSError, OverflowError or RuntimeError); png's limit is far beyond max_pixels.
_MAX_SIDE = {"webp": 16383, "jpeg": 65500, "gif": 65535, "avif": 65536}


def encode_image(img: Image.Image, fmt: str, compression: int | None) -> bytes:
    """Encode ``img`` as ``fmt`` with the gateway's speed-oriented settings (see module comments).

    The image is converted as the format needs: jpeg has no alpha (flattened onto white), gif is
    quantized to 255 colours plus one transparent index for pixels with alpha < 128, png, webp and
    avif keep alpha. ``compression`` (0..100) is the quality for jpeg (default 90), webp (90) and
    avif (80); it does not apply to png and gif, which are lossless. Metadata other than the ICC
    profile is dropped. Raises ``ValueError`` for an unknown ``fmt`` or compression out of range,
    :class:`FormatSizeLimit` for an image wider or taller than ``fmt`` can store.
    """
    return _encode(img, fmt, compression)[0]


def _encode(img: Image.Image, fmt: str, compression: int | None) -> tuple[bytes, bool]:
    """:func:`encode_image`, plus whether the encoded image has alpha (as :func:`probe` reports it)."""
    _check_options(fmt=fmt, compression=compression, background=None)
    limit = _MAX_SIDE.get(fmt)
    if limit is not None and max(img.size) > limit:
        raise FormatSizeLimit(f"{fmt} images are at most {limit} pixels per side; this one is {img.width}x{img.height}")
    img = _normalize_mode(img)
    params: dict[str, Any] = {}
    icc = img.info.get("icc_profile")
    if icc and fmt != "gif":
        params["icc_profile"] = icc
    quality = _DEFAULT_QUALITY.get(fmt, 0) if compression is None else compression
    if fmt == "png":
        params["compress_level"] = _PNG_COMPRESS_LEVEL
    elif fmt == "jpeg":
        img = _flatten(img)
        params.update(quality=quality, optimize=False)
    elif fmt == "webp":
        params.update(quality=quality, method=_WEBP_METHOD)
    elif fmt == "avif":
        params.update(quality=quality, speed=_AVIF_SPEED)
    else:  # gif
        img, transparency = _to_palette(img)
        if transparency is not None:
            params["transparency"] = transparency
    out = io.BytesIO()
    img.save(out, format=fmt.upper(), **params)
    return out.getvalue(), img.mode in _ALPHA_MODES or "transparency" in params


def _check_options(*, fmt: str, compression: int | None, background: str | None) -> None:
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unsupported output format {fmt!r}; expected one of {sorted(OUTPUT_FORMATS)}")
    if compression is not None and not 0 <= compression <= 100:
        raise ValueError(f"compression must be within 0..100, got {compression}")
    if background is not None and background not in _BACKGROUNDS:
        raise ValueError(f"background must be one of {sorted(_BACKGROUNDS)}, got {background!r}")
    if background == "transparent" and fmt == "jpeg":
        raise ImageError("jpeg cannot have a transparent background")


def _normalize_mode(img: Image.Image) -> Image.Image:
    """Convert to RGB, or RGBA when the image carries any transparency (L and LA are kept)."""
    if img.mode in ("RGB", "RGBA", "L", "LA"):
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grayscale: scale to 8 bits instead of letting convert() clip to white.
        return img.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    return img.convert("RGBA" if img.has_transparency_data else "RGB")


def _flatten(img: Image.Image) -> Image.Image:
    """Composite any alpha onto white; images without alpha are returned unchanged."""
    if img.mode not in ("RGBA", "LA"):
        return img
    rgba = img.convert("RGBA")
    canvas = Image.new("RGB", img.size, _WHITE)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    canvas.info = dict(img.info)
    return canvas


def _to_palette(img: Image.Image) -> tuple[Image.Image, int | None]:
    """Quantize for GIF: 255 colours, index 255 for pixels with alpha < 128 if there are any."""
    rgb = img.convert("RGB")
    pal = rgb.quantize(255, method=Image.Quantize.FASTOCTREE)
    if img.mode not in ("RGBA", "LA"):
        return pal, None
    hidden = img.getchannel("A").point(lambda a: 255 if a < 128 else 0)
    if hidden.getbbox() is None:
        return pal, None
    pal.paste(255, mask=hidden)
    return pal, 255
