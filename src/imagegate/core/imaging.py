"""All CPU-bound image work: probing, transforming and encoding.

Everything here is a plain synchronous function over ``bytes`` or :class:`PIL.Image.Image`; the
async side of the gateway calls them through ``ImagePool.run`` (:mod:`imagegate.core.pool`,
re-exported here with :class:`Cancelled` and :func:`checkpoint`) so that decoding and encoding
never block the event loop (Pillow releases the GIL inside its codecs). Encoding lives in
:mod:`imagegate.core.encoding` and the error tree in :mod:`imagegate.core.image_errors`; both are
re-exported here.

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

from PIL import Image, ImageOps, UnidentifiedImageError

from imagegate.core.encoding import (
    _ALPHA_MODES,
    _LOSSY_FORMATS,
    OUTPUT_FORMATS,
    _check_options,
    _encode,
    _flatten,
    _normalize_mode,
    encode_image,
)
from imagegate.core.image_errors import FormatSizeLimit, ImageError, TooManyPixels, check_pixels
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
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # rotated by 90 or 270 degrees

# Resize in two steps (integer reduce, then LANCZOS) once the source is this many times larger.
_REDUCING_GAP = 3.0


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


# -- private helpers ---------------------------------------------------------------------------


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


def _cover(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover ``size`` and center-crop, in a single resampling pass."""
    width, height = img.size
    scale = max(size[0] / width, size[1] / height)
    crop_w, crop_h = size[0] / scale, size[1] / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    box = (left, top, left + crop_w, top + crop_h)
    return img.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=_REDUCING_GAP)
