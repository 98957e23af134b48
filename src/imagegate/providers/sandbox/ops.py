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
import math
import random
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from imagegate.core.imaging import TooManyPixels, check_pixels, checkpoint

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
MAX_PIXELS = 40_000_000

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Size = tuple[int, int]
_Apply = Callable[[Image.Image, float], Image.Image]
_Resize = Callable[[Size, float], Size]


class EditRefused(ValueError):
    """An edit that would break its budget or its inputs' rules; ``param`` is the request
    parameter to blame (``prompt``, ``image`` or ``mask``) and ``code`` the error code."""

    def __init__(self, message: str, *, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code

_SEPIA = (0.393, 0.769, 0.189, 0, 0.349, 0.686, 0.168, 0, 0.272, 0.534, 0.131, 0)
_CAPTION_PREFIX = "imagegate sandbox: "


@dataclass(frozen=True, slots=True)
class Operation:
    """One recognised instruction: the vocabulary ``name`` and its numeric ``amount``."""

    name: str
    amount: float

    def output_size(self, size: Size) -> Size:
        """The size of the image this operation makes from one of ``size``."""
        return _RULES_BY_NAME[self.name].size(size, self.amount)

    def apply(self, img: Image.Image, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
        """Return ``img`` (RGB or RGBA) with this operation applied, within the pixel budget."""
        check_pixels(self.output_size(img.size), max_pixels, f"the result of '{self}'")
        return _RULES_BY_NAME[self.name].apply(img, self.amount)

    def __str__(self) -> str:
        return f"{self.name} {self.amount:g}" if self.name in ("rotate", "blur", "posterize") else self.name


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    description: str
    pattern: re.Pattern[str]
    amount: Callable[[re.Match[str]], float]
    apply: _Apply
    size: _Resize


def _number(group: str, default: float) -> Callable[[re.Match[str]], float]:
    """Amount from an optional numeric group of the match, else ``default``."""
    return lambda m: float(m[group]) if m[group] else default


def _fixed(value: float) -> Callable[[re.Match[str]], float]:
    return lambda m: value


def _rotation(m: re.Match[str]) -> float:
    if m["side"]:
        return 90.0 if m["side"].lower() == "left" else -90.0
    degrees = float(m["deg"]) if m["deg"] else 90.0
    return -degrees if m["dir"] and m["dir"].lower() == "clockwise" else degrees


def _flip_or_mirror(m: re.Match[str]) -> float:
    """1 flips top to bottom, 0 mirrors left to right ("flip horizontally" is a mirror)."""
    if m["axis"] and m["axis"].lower().startswith("horizontal"):
        return 0.0
    return 0.0 if m[0].lower().startswith("mirror") else 1.0


def _rgb_only(fn: Callable[[Image.Image, float], Image.Image]) -> _Apply:
    """Apply a colour operation to the RGB channels, leaving any alpha untouched."""

    def apply(img: Image.Image, amount: float) -> Image.Image:
        if img.mode != "RGBA":
            return fn(img, amount)
        out = fn(img.convert("RGB"), amount).convert("RGBA")
        out.putalpha(img.getchannel("A"))
        return out

    return apply


def _grayscale(img: Image.Image, _: float) -> Image.Image:
    return img.convert("L").convert("RGB")


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    return img.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True)


def _rotated_size(size: Size, degrees: float) -> Size:
    """The canvas of an expanding rotation: exact for multiples of 90, else at most 2 px over Pillow's."""
    width, height = size
    turn = degrees % 360.0
    if turn in (0.0, 180.0):
        return size
    if turn in (90.0, 270.0):
        return height, width
    cos, sin = abs(math.cos(math.radians(turn))), abs(math.sin(math.radians(turn)))
    return math.ceil(width * cos + height * sin) + 1, math.ceil(width * sin + height * cos) + 1


def _same(size: Size, _: float) -> Size:
    return size


def _flip(img: Image.Image, vertical: float) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_TOP_BOTTOM if vertical else Image.Transpose.FLIP_LEFT_RIGHT)


def _rule(name: str, description: str, pattern: str, amount: Callable[[re.Match[str]], float],
          apply: _Apply, size: _Resize = _same) -> _Rule:
    return _Rule(name, description, re.compile(rf"\b(?:{pattern})\b", re.IGNORECASE), amount, apply, size)


_NUMBER = r"\d{1,4}(?:\.\d+)?"
# The vocabulary, as data: each rule's regex, how it reads its amount, and what it does.
_RULES: tuple[_Rule, ...] = (
    _rule("grayscale", "grayscale | greyscale | black and white: drop colour",
          r"gr[ae]y\s*scale|black\s+and\s+white", _fixed(0.0), _rgb_only(_grayscale)),
    _rule("invert", "invert | negative: invert colours", r"invert|negative",
          _fixed(0.0), _rgb_only(lambda img, _: ImageOps.invert(img))),
    _rule("blur", "blur [N]: Gaussian blur of radius N pixels (default 4)",
          rf"blur(?:red|ry)?(?:\s+(?P<radius>{_NUMBER}))?", _number("radius", 4.0),
          _rgb_only(lambda img, r: img.filter(ImageFilter.GaussianBlur(r)))),
    _rule("sharpen", "sharpen | sharper: unsharp mask", r"sharpen|sharper",
          _fixed(0.0), _rgb_only(lambda img, _: img.filter(ImageFilter.UnsharpMask(2, 150, 3)))),
    _rule("sepia", "sepia: old-photo brown tones", r"sepia",
          _fixed(0.0), _rgb_only(lambda img, _: img.convert("RGB", _SEPIA))),
    _rule("rotate", "rotate [N [degrees]] [clockwise] | rotate left | rotate right: "
          "rotate N degrees counter-clockwise (default 90), canvas expanded",
          rf"rotate(?:\s+(?P<side>left|right)|\s+(?P<deg>-?{_NUMBER})(?:\s*(?:degrees?|deg|°))?)?"
          r"(?:\s+(?P<dir>clockwise|counter-?clockwise|anti-?clockwise))?",
          _rotation, _rotate, _rotated_size),
    _rule("flip", "flip [vertically] | mirror | flip horizontally: flip top to bottom, or mirror "
          "left to right", r"flip(?:\s+(?P<axis>horizontal(?:ly)?|vertical(?:ly)?))?|mirror(?:ed)?",
          _flip_or_mirror, _flip),
    _rule("brighten", "brighten | brighter: brightness x1.3", r"brighten|brighter",
          _fixed(1.3), _rgb_only(lambda img, f: ImageEnhance.Brightness(img).enhance(f))),
    _rule("darken", "darken | darker: brightness x0.7", r"darken|darker",
          _fixed(0.7), _rgb_only(lambda img, f: ImageEnhance.Brightness(img).enhance(f))),
    _rule("contrast", "contrast: contrast x1.5", r"contrast",
          _fixed(1.5), _rgb_only(lambda img, f: ImageEnhance.Contrast(img).enhance(f))),
    _rule("posterize", "posterize [1-8]: keep N bits per channel (default 3)",
          r"posteri[sz]e(?:\s+(?P<bits>[1-8])(?!\d))?", _number("bits", 3.0),
          _rgb_only(lambda img, bits: ImageOps.posterize(img, int(bits)))),
)
_RULES_BY_NAME = {rule.name: rule for rule in _RULES}

#: ``(name, description)`` of every prompt word :func:`edit` understands, for documentation.
VOCABULARY: tuple[tuple[str, str], ...] = tuple((rule.name, rule.description) for rule in _RULES)


def parse_operations(prompt: str) -> list[Operation]:
    """The operations named in ``prompt``, in the order they appear (repeats are kept)."""
    found = [
        (match.start(), index, Operation(rule.name, rule.amount(match)))
        for index, rule in enumerate(_RULES)
        for match in rule.pattern.finditer(prompt)
    ]
    return [op for _, _, op in sorted(found, key=lambda item: item[:2])]


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
