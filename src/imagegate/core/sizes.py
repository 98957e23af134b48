"""Pure size, aspect-ratio and resolution-tier parsing, and nearest matching.

Matching is always by nearest on a log scale: a ratio r is compared by |log r - log c|
(so 7:1 picks 8:1 over 4:1), a tier by |log megapixels|. No hand-ordered if-ranges.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from imagegate.core.errors import InvalidRequest

__all__ = [
    "MAX_SIDE",
    "TIER_MEGAPIXELS",
    "Ratio",
    "Size",
    "SizePresets",
    "SizeTarget",
    "nearest",
    "nearest_ratio",
    "parse_aspect_ratio",
    "parse_resolution",
    "parse_size",
    "resolve_target",
]

MAX_SIDE = 14142
# Named resolution tiers and the megapixels they stand for.
TIER_MEGAPIXELS: Mapping[str, float] = {"0.5K": 0.25, "1K": 1.0, "2K": 4.0, "4K": 16.0}

_WXH = re.compile(r"^\s*(\d{1,6})\s*[xX\u00d7]\s*(\d{1,6})\s*$")
_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")
_TIER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[kK]\s*$")
T = TypeVar("T")

_MIN_MEGAPIXELS, _MAX_MEGAPIXELS = 1e-4, 400.0  # beyond these no model has a tier (and floats misbehave)
_MEGAPIXELS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:mp|MP)?\s*$")


@dataclass(frozen=True, slots=True)
class Size:
    width: int
    height: int

    @property
    def ratio(self) -> float:
        return self.width / self.height

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True, slots=True)
class Ratio:
    label: str  # as written, normalised: "16:9"
    value: float


def parse_size(value: str, *, param: str = "size") -> Size | Ratio | None:
    """`WxH` (1..14142 per side) -> Size; `W:H` -> Ratio; `auto` -> None."""
    text = value.strip()
    if text.lower() == "auto":
        return None
    if m := _WXH.match(text):
        w, h = int(m.group(1)), int(m.group(2))
        if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
            raise InvalidRequest(
                f"Invalid value: '{value}'. Each side of `size` must be between 1 and {MAX_SIDE} pixels.",
                param=param,
            )
        return Size(w, h)
    if _RATIO.match(text):
        return parse_aspect_ratio(text, param=param)
    raise InvalidRequest(
        f"Invalid value: '{value}'. `size` must be 'WxH' (e.g. '1024x1024'), 'W:H' (e.g. '16:9') or 'auto'.",
        param=param,
    )


def parse_aspect_ratio(value: str, *, param: str = "aspect_ratio") -> Ratio:
    m = _RATIO.match(value)
    if not m or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        raise InvalidRequest(
            f"Invalid value: '{value}'. `{param}` must be 'W:H' with positive numbers (e.g. '16:9') or 'auto'.",
            param=param,
        )
    w, h = float(m.group(1)), float(m.group(2))
    if not (1 / 100 <= w / h <= 100):
        raise InvalidRequest(f"Invalid value: '{value}'. The aspect ratio must be within 1:100 and 100:1.", param=param)
    return Ratio(f"{m.group(1)}:{m.group(2)}", w / h)


def parse_resolution(value: str, *, param: str = "resolution") -> float:
    """A tier (`0.5K`, `1K`, `2K`, `4K`, any `<number>K`) or megapixels (`0.25`, `1`, `4MP`) -> megapixels."""
    megapixels: float | None = None
    if m := _TIER.match(value):
        megapixels = float(m.group(1)) ** 2
    elif m := _MEGAPIXELS.match(value):
        megapixels = float(m.group(1))
    if megapixels is not None and _MIN_MEGAPIXELS <= megapixels <= _MAX_MEGAPIXELS:
        return megapixels
    raise InvalidRequest(
        f"Invalid value: '{value}'. `resolution` must be a tier such as '0.5K', '1K', '2K', '4K' "
        "or megapixels such as '0.25' or '1'.",
        param=param,
    )


def nearest(target: float, candidates: Iterable[tuple[T, float]]) -> T:
    """The candidate whose value is nearest to `target` on a log scale (first wins a tie)."""
    best: T | None = None
    best_distance = math.inf
    for key, value in candidates:
        distance = abs(math.log(value) - math.log(target))
        if distance < best_distance - 1e-12:
            best, best_distance = key, distance
    if best is None:
        raise ValueError("no candidates")
    return best


def nearest_ratio(ratio: float, labels: Iterable[str]) -> str:
    """The label (`W:H`) nearest to `ratio`: 7:1 -> 8:1 when 4:1 and 8:1 exist."""
    return nearest(ratio, ((label, _label_value(label)) for label in labels))


def _label_value(label: str) -> float:
    w, h = label.split(":")
    return float(w) / float(h)


@dataclass(frozen=True, slots=True)
class SizePresets:
    """A model's native size grid: the pixel size of each ratio at the base tier, and the tiers it offers.

    A preset at tier T is the base size scaled by sqrt(MP(T) / MP(base)), rounded.
    """

    base: Mapping[str, tuple[int, int]]  # ratio label -> (width, height) at `base_tier`
    tiers: tuple[str, ...] = ("1K",)
    base_tier: str = "1K"
    default_ratio: str = "1:1"
    default_tier: str = "1K"

    def size_for(self, ratio_label: str, tier: str) -> Size:
        w, h = self.base[ratio_label]
        scale = math.sqrt(TIER_MEGAPIXELS[tier] / TIER_MEGAPIXELS[self.base_tier])
        return Size(max(1, round(w * scale)), max(1, round(h * scale)))

    def nearest_tier(self, megapixels: float) -> str:
        return nearest(megapixels, ((tier, TIER_MEGAPIXELS[tier]) for tier in self.tiers))


@dataclass(frozen=True, slots=True)
class SizeTarget:
    """The output size a request resolves to. The gateway guarantees exactly width x height."""

    size: Size
    ratio: str  # nearest preset ratio label of the model
    tier: str  # nearest tier of the model
    preset: bool  # True when it came from aspect_ratio/resolution (a model preset), False for WxH

    @property
    def width(self) -> int:
        return self.size.width

    @property
    def height(self) -> int:
        return self.size.height


def resolve_target(
    *,
    size: str | None,
    aspect_ratio: str | None,
    resolution: str | None,
    presets: SizePresets,
    input_size: Size | None = None,
) -> SizeTarget | None:
    """Resolve size / aspect_ratio / resolution against a model's presets.

    - `size` always wins: `WxH` is the exact target, `W:H` behaves as `aspect_ratio` at the
      default tier, `auto` means the model chooses (None).
    - otherwise `aspect_ratio` picks the shape and `resolution` the scale; a missing shape
      keeps the input image's shape (edits) or the model's default; a missing scale keeps the
      model's default tier. Both absent (or `auto`) -> None.
    """
    if size is None and resolution is None and (aspect_ratio is None or aspect_ratio.strip().lower() == "auto"):
        return None  # the common case: the model chooses
    labels = list(presets.base)
    if size is not None:
        parsed = parse_size(size)
        if parsed is None:
            return None
        if isinstance(parsed, Size):
            return SizeTarget(
                parsed,
                ratio=nearest_ratio(parsed.ratio, labels),
                tier=presets.nearest_tier(parsed.pixels / 1_000_000),
                preset=False,
            )
        label = nearest_ratio(parsed.value, labels)
        return SizeTarget(presets.size_for(label, presets.default_tier), label, presets.default_tier, True)

    shape = None if aspect_ratio is None or aspect_ratio.strip().lower() == "auto" else aspect_ratio
    if shape is None and resolution is None:
        return None
    if shape is not None:
        label = nearest_ratio(parse_aspect_ratio(shape).value, labels)
    elif input_size is not None:
        label = nearest_ratio(input_size.ratio, labels)
    else:
        label = presets.default_ratio
    tier = presets.default_tier if resolution is None else presets.nearest_tier(parse_resolution(resolution))
    return SizeTarget(presets.size_for(label, tier), label, tier, True)
