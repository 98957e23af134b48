"""The sandbox "model": deterministic, offline picture operations driven by the prompt.

Pure functions over PIL images (no I/O); the sandbox adapter converts bytes with
:mod:`imagegate.core.imaging`.

- :func:`generate` draws a picture determined by ``prompt`` and ``seed`` alone.
- :func:`edit` applies the words of :data:`VOCABULARY` it finds in the prompt, in the order they
  appear (case-insensitive, whole words). A prompt with no known word returns the input with a
  caption bar ``imagegate sandbox: <prompt>`` so that a round trip is still visible.

Rotation angles follow the mathematical convention: positive is counter-clockwise.

Bounded work: :func:`plan_edit` checks a whole edit from the input sizes alone, before any pixel
is touched: at most ``max_operations`` operations, and every image the edit would make (each
input scaled for the side-by-side composite, the composite, the result of every operation) within
``max_pixels``. Each rule states the size it produces next to what it does, and the same
:func:`imaging.check_pixels` runs again right before each allocation, which is also where a
cancelled job stops. A refused edit raises :class:`EditRefused` naming the request parameter.
"""

from __future__ import annotations

import hashlib
import random
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from imagegate.core.imaging import TooManyPixels, check_pixels, checkpoint
from imagegate.providers.sandbox.vocabulary import MAX_PIXELS, VOCABULARY, Operation, Size, parse_operations

__all__ = [
    "MAX_OPERATIONS",
    "MAX_PIXELS",
    "VOCABULARY",
    "EditRefused",
    "Operation",
    "edit",
    "generate",
    "parse_operations",
    "plan_edit",
]

#: Defaults of the budget arguments (the gateway passes its settings).
MAX_OPERATIONS = 16

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


class EditRefused(ValueError):
    """An edit that would break its budget or its inputs' rules; ``param`` is the request
    parameter to blame (``prompt``, ``image`` or ``mask``) and ``code`` the error code."""

    def __init__(self, message: str, *, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code

_CAPTION_PREFIX = "imagegate sandbox: "


def plan_edit(
    sizes: Sequence[Size],
    prompt: str,
    *,
    mask_size: Size | None = None,
    max_pixels: int = MAX_PIXELS,
    max_operations: int = MAX_OPERATIONS,
) -> list[Operation]:
    """Check an edit of images of ``sizes`` from the sizes alone and return its operations.

    Raises :class:`EditRefused`: ``prompt`` for more than ``max_operations`` operations or an
    operation whose result would exceed ``max_pixels``; ``image`` for a side-by-side composite
    (or a scaled input) over ``max_pixels``; ``mask`` for a mask whose size is not the first
    image's. Nothing is decoded or allocated, so a refusal costs microseconds."""
    if not sizes:
        raise ValueError("edit needs at least one image")
    operations = parse_operations(prompt)
    if len(operations) > max_operations:
        raise EditRefused(
            f"The prompt asks for {len(operations)} operations; the sandbox runs at most {max_operations} "
            "per request.",
            param="prompt",
            code="too_many_operations",
        )
    if mask_size is not None and tuple(mask_size) != tuple(sizes[0]):
        raise EditRefused(
            f"The mask is {mask_size[0]}x{mask_size[1]} but the image is {sizes[0][0]}x{sizes[0][1]}; "
            "the mask must have the same dimensions as the (first) image.",
            param="mask",
        )
    try:
        size = _composite_size(sizes, max_pixels)
    except TooManyPixels as exc:
        raise EditRefused(f"The input images are too large to combine: {exc.reason}.", param="image",
                          code="image_too_large") from None
    for step, operation in enumerate(operations, start=1):
        size = operation.output_size(size)
        try:
            check_pixels(size, max_pixels, f"step {step} of the prompt ('{operation}')")
        except TooManyPixels as exc:
            raise EditRefused(f"The prompt's operations make too large an image: {exc.reason}.", param="prompt",
                              code="image_too_large") from None
    return operations


def edit(
    images: Sequence[Image.Image],
    prompt: str,
    *,
    mask: Image.Image | None = None,
    max_pixels: int = MAX_PIXELS,
    max_operations: int = MAX_OPERATIONS,
) -> Image.Image:
    """Apply the prompt's operations to ``images`` placed side by side.

    The edit is checked first (:func:`plan_edit`: budget, operation count, mask size). Images
    after the first are scaled to the first one's height and appended to the right. With a
    ``mask`` (OpenAI semantics: where its alpha is 0 is edited, where it is 255 is kept; it has
    the first image's size and covers the first image; the other images are edited unmasked) the
    result is blended by the mask's alpha; operations that change the size are then stretched back
    to the original size. If no operation is recognised, the combined image gets a caption bar
    showing the prompt. Raises :class:`EditRefused`, or ``ValueError`` for no images or a mask
    without alpha. Stops with :class:`imaging.Cancelled` between operations if cancelled.
    """
    operations = plan_edit([img.size for img in images], prompt, mask_size=mask.size if mask else None,
                           max_pixels=max_pixels, max_operations=max_operations)
    keep = _mask_alpha(mask) if mask is not None else None
    base = _side_by_side(images, max_pixels)
    if not operations:
        return _caption(base, prompt)
    edited = base
    for operation in operations:
        edited = operation.apply(edited, max_pixels=max_pixels)  # a boundary: a cancelled job stops here
    if keep is None:
        return edited
    checkpoint()
    if keep.size != base.size:  # several images: the mask covers the first, the rest is edited
        full = Image.new("L", base.size, 0)
        full.paste(keep, (0, 0))
        keep = full
    if edited.size != base.size:
        edited = edited.resize(base.size, Image.Resampling.LANCZOS)
    mode = "RGBA" if "RGBA" in (base.mode, edited.mode) else "RGB"
    return Image.composite(base.convert(mode), edited.convert(mode), keep)


def generate(prompt: str, *, seed: int | None, size: Size, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A deterministic RGB picture of exactly ``size`` from ``prompt`` and ``seed``.

    A two-colour gradient, translucent shapes and the prompt as text, all chosen from
    ``sha256(f"{prompt}|{seed}")``: equal inputs give identical pixels, another seed another picture.
    Raises ``ValueError`` for an empty size and :class:`imaging.TooManyPixels` above ``max_pixels``.
    """
    check_pixels(size, max_pixels, "the generated image")
    width, height = size
    digest = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
    rng = random.Random(digest)

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    gradient = Image.linear_gradient("L") if rng.random() < 0.75 else Image.radial_gradient("L")
    gradient = gradient.rotate(90 * rng.randrange(4)).resize(size, Image.Resampling.BILINEAR)
    img = Image.composite(Image.new("RGB", size, colour()), Image.new("RGB", size, colour()), gradient)

    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(rng.randint(4, 8)):
        x0, x1 = sorted(rng.randrange(-width // 4, width + width // 4) for _ in range(2))
        y0, y1 = sorted(rng.randrange(-height // 4, height + height // 4) for _ in range(2))
        shape, fill = rng.randrange(3), (*colour(), rng.randint(96, 200))
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)

    font_size = max(10, min(width, height) // 24)
    font = ImageFont.load_default(font_size)
    columns = max(8, int(width * 0.9 / (font_size * 0.55)))
    lines = textwrap.wrap(prompt, columns, max_lines=6, placeholder=" …") or [""]
    draw.multiline_text((width // 20, height // 20), "\n".join([*lines, f"seed {seed}"]), font=font,
                        fill=(255, 255, 255, 255), stroke_width=max(1, font_size // 12),
                        stroke_fill=(0, 0, 0, 255))
    return img


# -- private helpers ---------------------------------------------------------------------------


def _scaled_sizes(sizes: Sequence[Size]) -> list[Size]:
    """Every input's size once scaled to the first one's height."""
    height = sizes[0][1]
    return [(w, h) if h == height else (max(1, round(w * height / h)), height) for w, h in sizes]


def _composite_size(sizes: Sequence[Size], max_pixels: int) -> Size:
    """The side-by-side canvas of inputs of ``sizes``; every scaled input and the canvas are checked."""
    scaled = _scaled_sizes(sizes)
    for index, size in enumerate(scaled, start=1):
        check_pixels(size, max_pixels, f"image {index} scaled to the first image's height")
    canvas = (sum(w for w, _ in scaled), sizes[0][1])
    check_pixels(canvas, max_pixels, "the images placed side by side")
    return canvas


def _side_by_side(images: Sequence[Image.Image], max_pixels: int) -> Image.Image:
    if not images:
        raise ValueError("edit needs at least one image")
    mode = "RGBA" if any(_has_alpha(img) for img in images) else "RGB"
    canvas_size = _composite_size([img.size for img in images], max_pixels)
    parts = [img.convert(mode) for img in images]
    parts = [
        part if part.size == size else part.resize(size, Image.Resampling.LANCZOS)
        for part, size in zip(parts, _scaled_sizes([img.size for img in images]), strict=True)
    ]
    if len(parts) == 1:
        return parts[0]
    canvas = Image.new(mode, canvas_size)
    x = 0
    for part in parts:
        canvas.paste(part, (x, 0))
        x += part.width
    return canvas


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.has_transparency_data


def _mask_alpha(mask: Image.Image) -> Image.Image:
    if not _has_alpha(mask):
        raise ValueError("mask must have an alpha channel (alpha 0 marks the area to edit)")
    return mask.convert("RGBA").getchannel("A")


def _caption(img: Image.Image, prompt: str) -> Image.Image:
    """Draw a dark bar with ``imagegate sandbox: <prompt>`` (shortened to fit) at the bottom."""
    out = img.copy()
    width, height = out.size
    font_size = max(8, min(32, height // 20, width // 16))
    font = ImageFont.load_default(font_size)
    bar = min(height, font_size * 2)
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, height - bar, width, height), fill="#181818")
    text = _fit(draw, _CAPTION_PREFIX + " ".join(prompt.split()), font, width - font_size)
    draw.text((font_size // 2, height - bar // 2), text, font=font, fill="white", anchor="lm")
    return out


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int) -> str:
    """``text``, cut and ended with "…" if needed so that it is at most ``width`` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    low, high = 0, len(text)  # longest prefix that fits, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if draw.textlength(text[:middle] + "…", font=font) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low] + "…"
