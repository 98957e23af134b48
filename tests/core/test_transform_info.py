"""`transform_with_info` describes its output exactly as `probe` would, without parsing it again."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imagegate.core import imaging


def _png(mode: str, size: tuple[int, int] = (64, 48), **info: object) -> bytes:
    color: object = (10, 200, 30, 128) if "A" in mode else (10, 200, 30) if mode == "RGB" else 7
    img = Image.new(mode, size, color)  # type: ignore[arg-type]
    if mode == "P":
        img.putpalette([i % 256 for i in range(768)])
    out = io.BytesIO()
    img.save(out, "PNG", **info)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "avif", "gif"])
@pytest.mark.parametrize(
    ("source", "size", "background"),
    [
        (_png("RGB"), None, None),
        (_png("RGBA"), None, None),
        (_png("RGBA"), (32, 32), None),
        (_png("RGBA"), None, "opaque"),
        (_png("P", transparency=7), (20, 30), None),
        (_png("L"), None, None),
    ],
)
def test_info_matches_a_probe_of_the_output(
    fmt: str, source: bytes, size: tuple[int, int] | None, background: str | None
) -> None:
    data, info = imaging.transform_with_info(
        source, size=size, fmt=fmt, compression=70, background=background, max_pixels=10_000
    )
    probed = imaging.probe(data, max_pixels=10_000)
    assert (info.format, info.width, info.height) == (probed.format, probed.width, probed.height)
    if fmt in ("png", "jpeg", "gif"):  # (lossy webp/avif encoders may drop an alpha plane that is all opaque)
        assert info.has_alpha == probed.has_alpha
    again = imaging.transform(source, size=size, fmt=fmt, compression=70, background=background, max_pixels=10_000)
    assert imaging.probe(again, max_pixels=10_000) == probed
