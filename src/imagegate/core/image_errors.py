"""The image error tree and the pixel budget, shared by decoding (:mod:`imagegate.core.imaging`)
and encoding (:mod:`imagegate.core.encoding`); :mod:`imagegate.core.imaging` re-exports them."""

from __future__ import annotations

from imagegate.core.pool import checkpoint

__all__ = ["FormatSizeLimit", "ImageError", "TooManyPixels", "check_pixels"]


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
