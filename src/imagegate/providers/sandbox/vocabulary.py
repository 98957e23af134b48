"""The sandbox's vocabulary, as data: each prompt word's regex, how it reads its amount, what it
does to an image and the size of the image it makes. Re-exported by
:mod:`imagegate.providers.sandbox.ops` (its public import path)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from imagegate.core.imaging import check_pixels

__all__ = ["MAX_PIXELS", "VOCABULARY", "Operation", "Size", "parse_operations"]

#: The default of the pixel budget arguments (the gateway passes its settings).
MAX_PIXELS = 40_000_000

Size = tuple[int, int]
_Apply = Callable[[Image.Image, float], Image.Image]
_Resize = Callable[[Size, float], Size]

_SEPIA = (0.393, 0.769, 0.189, 0, 0.349, 0.686, 0.168, 0, 0.272, 0.534, 0.131, 0)


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
