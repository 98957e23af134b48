from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from typing import Any

import pytest
from PIL import Image

from imagegate.core.imaging import (
    ImageError,
    ImageInfo,
    ImagePool,
    TooManyPixels,
    encode_image,
    needs_transform,
    probe,
    transform,
)

MAX = 50_000_000


def _encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **params)
    return out.getvalue()


def _photo(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """A non-trivial picture (noise over a gradient) so codecs have something to compress."""
    base = Image.linear_gradient("L").resize(size).convert("RGB")
    noisy = Image.blend(base, Image.effect_noise(size, 60).convert("RGB"), 0.5).convert(mode)
    if mode == "RGBA":  # real transparency: encoders drop an all-opaque alpha channel
        noisy.putalpha(Image.linear_gradient("L").resize(size))
    return noisy


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring ``width`` x ``height`` RGB with no real pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _open(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# -- probe ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pillow_fmt", "expected", "mode"),
    [
        ("PNG", "png", "RGBA"),
        ("JPEG", "jpeg", "RGB"),
        ("WEBP", "webp", "RGBA"),
        ("GIF", "gif", "RGB"),
        ("AVIF", "avif", "RGB"),
        ("BMP", "bmp", "RGB"),
    ],
)
def test_probe_identifies_format_from_bytes(pillow_fmt: str, expected: str, mode: str) -> None:
    data = _encode(_photo((40, 30), mode), pillow_fmt)
    info = probe(data, max_pixels=MAX)
    assert info == ImageInfo(format=expected, width=40, height=30, has_alpha=mode == "RGBA")


def test_tiff_is_not_accepted() -> None:
    with pytest.raises(ImageError):
        probe(_encode(_photo((40, 30), "RGB"), "TIFF"), max_pixels=MAX)


def test_probe_reports_palette_transparency_as_alpha() -> None:
    img = Image.new("P", (8, 8), 0)
    data = _encode(img, "PNG", transparency=0)
    assert probe(data, max_pixels=MAX).has_alpha is True


def test_probe_reports_displayed_size_for_rotated_jpeg() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    data = _encode(_photo((40, 30)), "JPEG", exif=exif.tobytes())
    info = probe(data, max_pixels=MAX)
    assert (info.width, info.height) == (30, 40)
    assert Image.open(io.BytesIO(transform(data, size=None, fmt="png", compression=None,
                                           background=None, max_pixels=MAX))).size == (30, 40)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is a text file\n" * 4,
        _encode(_photo(), "PNG")[:30],
        b"\x00\x00\x01\x00" + b"\x00" * 60,  # ICO-like header: a real format, but not allowed
    ],
    ids=["empty", "text", "truncated-header", "unsupported"],
)
def test_probe_rejects_non_images(data: bytes) -> None:
    with pytest.raises(ImageError) as caught:
        probe(data, max_pixels=MAX)
    assert not isinstance(caught.value, TooManyPixels)
    assert caught.value.reason


def test_probe_rejects_huge_declared_size_without_decoding() -> None:
    data = _png_header_only(100_000, 100_000)
    started = time.perf_counter()
    with pytest.raises(TooManyPixels):
        probe(data, max_pixels=MAX)
    assert time.perf_counter() - started < 0.5


def test_probe_enforces_callers_limit_below_pillows() -> None:
    data = _png_header_only(5000, 5000)
    with pytest.raises(TooManyPixels, match="5000x5000"):
        probe(data, max_pixels=5000 * 5000 - 1)
    assert probe(data, max_pixels=5000 * 5000).width == 5000


def test_probe_verify_catches_truncated_pixel_data() -> None:
    data = _encode(_photo((128, 128)), "PNG")
    cut = data[: len(data) * 2 // 3]
    assert probe(cut, max_pixels=MAX).format == "png"  # the header alone looks fine
    with pytest.raises(ImageError):
        probe(cut, max_pixels=MAX, verify=True)
    assert probe(data, max_pixels=MAX, verify=True).width == 128


# -- transform -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "gif", "avif"])
def test_transform_gives_exact_size_and_format(fmt: str) -> None:
    data = _encode(_photo((90, 60)), "PNG")
    out = transform(data, size=(50, 70), fmt=fmt, compression=None, background=None, max_pixels=MAX)
    img = Image.open(io.BytesIO(out))
    assert img.size == (50, 70)
    assert probe(out, max_pixels=MAX).format == fmt


def test_transform_cover_crops_center_of_wide_image() -> None:
    # red | green | blue | red, 50 px each: covering 1:1 keeps exactly the green and blue bands
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 255, 0), (50, 0, 100, 100))
    img.paste((0, 0, 255), (100, 0, 150, 100))
    out = _open(transform(_encode(img, "PNG"), size=(40, 40), fmt="png", compression=None,
                          background=None, max_pixels=MAX)).convert("RGB")
    assert out.size == (40, 40)
    for y in (0, 20, 39):
        red, green, _ = out.getpixel((2, y))  # type: ignore[misc]
        assert green > 230 and red < 30
        red, _, blue = out.getpixel((37, y))  # type: ignore[misc]
        assert blue > 230 and red < 30


def test_transform_downscales_large_jpeg() -> None:
    data = _encode(_photo((1600, 1200)), "JPEG")
    out = transform(data, size=(100, 100), fmt="jpeg", compression=None, background=None, max_pixels=MAX)
    assert Image.open(io.BytesIO(out)).size == (100, 100)


def test_transform_fits_rotated_jpeg_by_its_displayed_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1200x400, displayed 400x1200
    data = _encode(_photo((1200, 400)), "JPEG", exif=exif.tobytes())
    out = transform(data, size=(100, 300), fmt="png", compression=None, background=None, max_pixels=MAX)
    assert Image.open(io.BytesIO(out)).size == (100, 300)


def test_transform_to_jpeg_flattens_alpha_on_white() -> None:
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    out = _open(transform(_encode(img, "PNG"), size=None, fmt="jpeg", compression=None,
                          background=None, max_pixels=MAX))
    assert out.mode == "RGB"
    assert all(channel > 245 for channel in out.getpixel((5, 5)))  # type: ignore[union-attr]


def test_transform_background_opaque_flattens_and_transparent_keeps_alpha() -> None:
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    data = _encode(img, "PNG")
    opaque = _open(transform(data, size=None, fmt="png", compression=None, background="opaque",
                             max_pixels=MAX))
    assert opaque.mode == "RGB"
    assert opaque.getpixel((0, 0)) == (255, 255, 255)
    kept = _open(transform(data, size=None, fmt="webp", compression=None, background="transparent",
                           max_pixels=MAX))
    assert kept.mode == "RGBA"
    assert kept.getpixel((0, 0))[3] == 0  # type: ignore[index]
    with pytest.raises(ImageError):
        transform(data, size=None, fmt="jpeg", compression=None, background="transparent", max_pixels=MAX)


def test_transform_to_gif_keeps_transparency() -> None:
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, 5, 10))
    out = _open(transform(_encode(img, "PNG"), size=None, fmt="gif", compression=None,
                          background=None, max_pixels=MAX)).convert("RGBA")
    assert out.getpixel((0, 0))[3] == 0  # type: ignore[index]
    assert out.getpixel((9, 0)) == (255, 0, 0, 255)


def test_compression_changes_jpeg_size() -> None:
    data = _encode(_photo((256, 256)), "PNG")
    low = transform(data, size=None, fmt="jpeg", compression=10, background=None, max_pixels=MAX)
    high = transform(data, size=None, fmt="jpeg", compression=95, background=None, max_pixels=MAX)
    assert len(low) < len(high) / 2


def test_transform_applies_max_pixels() -> None:
    data = _encode(_photo((100, 100)), "PNG")
    with pytest.raises(TooManyPixels):
        transform(data, size=(10, 10), fmt="png", compression=None, background=None, max_pixels=9999)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fmt": "bmp"},
        {"fmt": "PNG"},
        {"compression": 101},
        {"compression": -1},
        {"background": "checkerboard"},
        {"size": (0, 10)},
    ],
)
def test_transform_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"size": None, "fmt": "png", "compression": None, "background": None}
    args.update(kwargs)
    with pytest.raises(ValueError) as caught:
        transform(_encode(_photo(), "PNG"), max_pixels=MAX, **args)
    assert not isinstance(caught.value, ImageError)


def test_encode_image_settings() -> None:
    img = _photo((64, 64), "RGBA")
    assert _open(encode_image(img, "png", None)).mode == "RGBA"
    assert _open(encode_image(img, "jpeg", 50)).mode == "RGB"
    assert _open(encode_image(img, "avif", None)).mode == "RGBA"
    with pytest.raises(ValueError):
        encode_image(img, "tiff", None)


# -- needs_transform -------------------------------------------------------------------------------

PNG_RGB = ImageInfo(format="png", width=100, height=50, has_alpha=False)
PNG_RGBA = ImageInfo(format="png", width=100, height=50, has_alpha=True)
JPEG = ImageInfo(format="jpeg", width=100, height=50, has_alpha=False)
BMP = ImageInfo(format="bmp", width=100, height=50, has_alpha=False)


@pytest.mark.parametrize(
    ("info", "size", "fmt", "compression", "background", "expected"),
    [
        (PNG_RGB, None, "png", None, None, False),
        (PNG_RGB, (100, 50), "png", None, None, False),
        (PNG_RGB, (50, 100), "png", None, None, True),
        (PNG_RGB, None, "jpeg", None, None, True),
        (BMP, None, "png", None, None, True),
        (PNG_RGB, None, "png", 50, None, False),  # png is lossless: compression means nothing
        (JPEG, None, "jpeg", None, None, False),
        (JPEG, None, "jpeg", 50, None, True),
        (JPEG, None, "jpeg", None, "opaque", False),
        (PNG_RGBA, None, "png", None, "opaque", True),
        (PNG_RGBA, None, "png", None, "transparent", False),
        (PNG_RGB, None, "png", None, "transparent", False),  # transparency cannot be invented
        (PNG_RGBA, None, "png", None, "auto", False),
    ],
)
def test_needs_transform(
    info: ImageInfo,
    size: tuple[int, int] | None,
    fmt: str,
    compression: int | None,
    background: str | None,
    expected: bool,
) -> None:
    got = needs_transform(info, size=size, fmt=fmt, compression=compression, background=background)
    assert got is expected


def test_needs_transform_validates_like_transform() -> None:
    with pytest.raises(ValueError):
        needs_transform(PNG_RGB, size=None, fmt="tiff", compression=None, background=None)
    with pytest.raises(ImageError):
        needs_transform(JPEG, size=None, fmt="jpeg", compression=None, background="transparent")


# -- ImagePool -----------------------------------------------------------------------------------


async def test_pool_runs_work_off_the_event_loop_thread() -> None:
    pool = ImagePool(workers=2)
    try:
        caller = threading.get_ident()
        worker = await pool.run(threading.get_ident)
        assert worker != caller
        info = await pool.run(probe, _encode(_photo(), "PNG"), max_pixels=MAX)
        assert info.format == "png"
        with pytest.raises(ImageError):
            await pool.run(probe, b"", max_pixels=MAX)
    finally:
        pool.close()
    with pytest.raises(RuntimeError):
        await pool.run(threading.get_ident)


def test_pool_rejects_zero_workers_and_defaults_to_cpu_count() -> None:
    with pytest.raises(ValueError):
        ImagePool(workers=0)
    pool = ImagePool()
    assert pool.workers >= 1
    pool.close()
