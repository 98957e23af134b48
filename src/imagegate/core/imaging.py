"""All CPU-bound image work: probing, transforming and encoding.

Everything here is a plain synchronous function over ``bytes`` or :class:`PIL.Image.Image`; the
async side of the gateway calls them through ``ImagePool.run`` (:mod:`imagegate.core.pool`,
re-exported here with :class:`Cancelled` and :func:`checkpoint`) so that decoding and encoding
never block the event loop (Pillow releases the GIL inside its codecs).

Untrusted bytes are identified from their content only, never from a declared content type, and
their declared pixel count is checked against ``max_pixels`` before anything is decoded.

Bounded work. ``max_pixels`` holds for every image the gateway makes, not only for inputs: each
function that creates an image (a decode, a resize target, a canvas) calls :func:`check_pixels`
with the size it is about to allocate, before allocating it. :func:`check_pixels` is also an
operation boundary: a job whose awaiting task was cancelled (the client went away, the deadline
passed) raises :class:`Cancelled` there, so it stops consuming CPU at the next step instead of
finishing in the pool. Long jobs call :func:`checkpoint` between their steps too.

Errors::

    ValueError
     └── ImageError          unreadable, unsupported or corrupt image (``.reason``)
          ├── TooManyPixels  declared (or about to be allocated) width * height exceeds ``max_pixels``
          └── FormatSizeLimit  wider or taller than the output format can store (webp: 16383 px)
    Cancelled                the job's awaiting task was cancelled (raised in the worker thread)

A bad *argument* (unknown output format, compression outside 0..100, unknown background) is a
plain ``ValueError``: it is the caller's mistake, not the image's.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from imagegate.core.pool import Cancelled, ImagePool, checkpoint

__all__ = [
    "INPUT_FORMATS",
    "OUTPUT_FORMATS",
    "Cancelled",
    "FormatSizeLimit",
    "ImageError",
    "ImageInfo",
    "ImagePool",
    "TooManyPixels",
    "check_pixels",
    "checkpoint",
    "decode",
    "encode_image",
    "needs_transform",
    "probe",
    "transform",
    "transform_with_info",
]


#: Formats accepted as input, as reported in :attr:`ImageInfo.format` (multi-frame: first frame).
INPUT_FORMATS = frozenset({"png", "jpeg", "webp", "gif", "avif", "bmp"})  # no TIFF: a large decoder surface
#: Formats :func:`transform` and :func:`encode_image` can write.
OUTPUT_FORMATS = frozenset({"png", "jpeg", "webp", "gif", "avif"})
_LOSSY_FORMATS = frozenset({"jpeg", "webp", "avif"})
_BACKGROUNDS = frozenset({"opaque", "transparent", "auto"})

# Pillow's format names, and how they are reported. MPO (multi-picture JPEG from phone cameras) is
# opened by the JPEG plugin; its first picture is an ordinary JPEG.
_PILLOW_FORMATS: dict[str, str] = {
    "PNG": "png",
    "JPEG": "jpeg",
    "MPO": "jpeg",
    "WEBP": "webp",
    "GIF": "gif",
    "AVIF": "avif",
    "BMP": "bmp",
}
_OPENERS = tuple(name for name in _PILLOW_FORMATS if name != "MPO")
# Everything Pillow's parsers and decoders raise on hostile or broken input.
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # rotated by 90 or 270 degrees
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
# Resize in two steps (integer reduce, then LANCZOS) once the source is this many times larger.
_REDUCING_GAP = 3.0


class ImageError(ValueError):
    """The bytes are not a readable image of a supported format; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooManyPixels(ImageError):
    """An image has, or would have, more pixels than allowed; raised before its pixels are allocated."""


def check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    """The pixel budget, checked before ``size`` is allocated (and an operation boundary).

    Raises :class:`TooManyPixels` naming ``what`` (e.g. "the output", "step 3 (rotate 45)") when
    ``width * height > max_pixels``, and ``ValueError`` for an empty size."""
    checkpoint()
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"{what} would be {width}x{height}: sizes must be positive")
    if width * height > max_pixels:
        raise TooManyPixels(
            f"{what} would be {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


class FormatSizeLimit(ImageError):
    """The image is wider or taller than its output format can store; raised before encoding."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header of an image says: normalized format name, displayed size, alpha."""

    format: str
    width: int
    height: int
    has_alpha: bool


def probe(data: bytes, *, max_pixels: int, verify: bool = False) -> ImageInfo:
    """Identify an image from its bytes, reading only the header unless ``verify`` is set.

    Raises :class:`ImageError` for empty, non-image, truncated-header or unsupported data and
    :class:`TooManyPixels` when ``width * height > max_pixels`` (checked before decoding). With
    ``verify=True`` the first frame is fully decoded, so truncated or corrupt pixel data raises
    :class:`ImageError` too. JPEG width and height are reported as displayed, i.e. after the
    EXIF orientation (which :func:`transform` applies).
    """
    with _open(data, max_pixels=max_pixels) as im:
        info = _info(im)
        if verify:
            _load(im)
        return info


def needs_transform(
    info: ImageInfo,
    *,
    size: tuple[int, int] | None,
    fmt: str,
    compression: int | None,
    background: str | None,
) -> bool:
    """Whether :func:`transform` must re-encode an image described by ``info``.

    True when the format or the size differs, when ``compression`` is given for a lossy format
    (the source's quality is unknown, so the requested one can only be met by re-encoding) or when
    ``background="opaque"`` and the image has alpha. ``background="transparent"`` never forces a
    re-encode: transparency that is there is kept, and none can be invented. The arguments are
    validated exactly as :func:`transform` validates them.
    """
    _check_options(fmt=fmt, compression=compression, background=background)
    return (
        info.format != fmt
        or (size is not None and size != (info.width, info.height))
        or (compression is not None and fmt in _LOSSY_FORMATS)
        or (background == "opaque" and info.has_alpha)
    )


def transform(
    data: bytes,
    *,
    size: tuple[int, int] | None,
    fmt: str,
    compression: int | None,
    background: str | None,
    max_pixels: int,
) -> bytes:
    """:func:`transform_with_info` without the description of the result."""
    return transform_with_info(
        data, size=size, fmt=fmt, compression=compression, background=background, max_pixels=max_pixels
    )[0]


def transform_with_info(
    data: bytes,
    *,
    size: tuple[int, int] | None,
    fmt: str,
    compression: int | None,
    background: str | None,
    max_pixels: int,
) -> tuple[bytes, ImageInfo]:
    """Decode ``data``, fit it to ``size`` and encode it as ``fmt``; return the bytes and what
    :func:`probe` would say of them (known from the encoder's input, so nothing is parsed again).

    - The input is probed first (``max_pixels`` applies); EXIF orientation is applied.
    - ``size=(w, h)`` gives exactly that size with "cover" semantics: scaled to cover the box,
      then center-cropped (LANCZOS; big JPEG downscales decode at reduced DCT scale first).
    - ``background``: ``"opaque"`` flattens alpha onto white; ``"transparent"`` keeps alpha and is
      an :class:`ImageError` for jpeg; ``None``/``"auto"`` keep alpha where ``fmt`` can hold it.
      JPEG always flattens onto white; GIF keeps 1-bit transparency.
    - ``compression`` (0..100) is the quality of jpeg/webp/avif; png and gif are lossless.

    Raises ``ValueError`` for a bad argument and :class:`ImageError` for a bad image.
    """
    _check_options(fmt=fmt, compression=compression, background=background)
    if size is not None:
        check_pixels(size, max_pixels, "the output")
    im = _open(data, max_pixels=max_pixels)
    if size is not None:
        _draft_for_cover(im, size)
    _load(im)
    ImageOps.exif_transpose(im, in_place=True)
    img = _normalize_mode(im)
    if background == "opaque":
        img = _flatten(img)
    if size is not None and img.size != size:
        checkpoint()
        img = _cover(img, size)
    checkpoint()
    encoded, has_alpha = _encode(img, fmt, compression)
    return encoded, ImageInfo(format=fmt, width=img.size[0], height=img.size[1], has_alpha=has_alpha)


def decode(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode the first frame of ``data`` (probed as by :func:`probe`; ``max_pixels`` applies),
    EXIF orientation applied, so its size is the one :func:`probe` reports."""
    im = _open(data, max_pixels=max_pixels)
    _load(im)
    return ImageOps.exif_transpose(im) or im


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


# -- private helpers ---------------------------------------------------------------------------


def _check_options(*, fmt: str, compression: int | None, background: str | None) -> None:
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unsupported output format {fmt!r}; expected one of {sorted(OUTPUT_FORMATS)}")
    if compression is not None and not 0 <= compression <= 100:
        raise ValueError(f"compression must be within 0..100, got {compression}")
    if background is not None and background not in _BACKGROUNDS:
        raise ValueError(f"background must be one of {sorted(_BACKGROUNDS)}, got {background!r}")
    if background == "transparent" and fmt == "jpeg":
        raise ImageError("jpeg cannot have a transparent background")


def _open(data: bytes, *, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and enforce the format allow-list and ``max_pixels``."""
    if not data:
        raise ImageError("empty image")
    try:
        im = Image.open(io.BytesIO(data), formats=_OPENERS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own global limit (2 * Image.MAX_IMAGE_PIXELS) tripped before ours, or its
        # warning (above 1x) was turned into an error by a warnings filter. We never change it.
        raise TooManyPixels(f"image declares too many pixels ({exc})") from exc
    except UnidentifiedImageError as exc:  # its text names the in-memory file object: never shown
        raise ImageError("not a readable image of a supported format") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"not a readable image of a supported format ({exc})") from exc
    width, height = im.size
    if width < 1 or height < 1:
        im.close()
        raise ImageError(f"image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        im.close()
        raise TooManyPixels(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    return im


def _info(im: Image.Image) -> ImageInfo:
    fmt = _PILLOW_FORMATS[str(im.format)]
    width, height = im.size
    if fmt == "jpeg" and _jpeg_orientation(im) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    return ImageInfo(format=fmt, width=width, height=height, has_alpha=has_alpha)


def _jpeg_orientation(im: Image.Image) -> int:
    try:  # JPEG EXIF sits in APP1, already read by the header parse
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except _DECODE_ERRORS:
        return 1  # corrupt EXIF is ignored, as exif_transpose would ignore it
    return value if isinstance(value, int) else 1


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooManyPixels(f"image frame declares too many pixels ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"corrupt or truncated image data ({exc})") from exc


def _draft_for_cover(im: Image.Image, size: tuple[int, int]) -> None:
    """For JPEG, decode at a reduced DCT scale when the source is at least 2x the needed size."""
    if im.format not in ("JPEG", "MPO"):
        return
    width, height = im.size
    if _jpeg_orientation(im) in _SWAPPING_ORIENTATIONS:
        size = (size[1], size[0])  # the stored picture is the displayed one turned by 90 degrees
    scale = max(size[0] / width, size[1] / height)
    needed = (max(1, int(width * scale * 2)), max(1, int(height * scale * 2)))
    im.draft(None, needed)


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


def _cover(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover ``size`` and center-crop, in a single resampling pass."""
    width, height = img.size
    scale = max(size[0] / width, size[1] / height)
    crop_w, crop_h = size[0] / scale, size[1] / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    box = (left, top, left + crop_w, top + crop_h)
    return img.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=_REDUCING_GAP)


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
