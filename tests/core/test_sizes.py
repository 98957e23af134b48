from __future__ import annotations

import pytest

from imagegate.core.errors import InvalidRequest
from imagegate.core.presets import QWEN_PRESETS
from imagegate.core.sizes import (
    Ratio,
    Size,
    nearest_ratio,
    parse_resolution,
    parse_size,
    resolve_target,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024x1024", Size(1024, 1024)), ("1x14142", Size(1, 14142)), (" 800X600 ", Size(800, 600)), ("auto", None)],
)
def test_parse_size_accepts(text: str, expected: Size | None) -> None:
    assert parse_size(text) == expected


def test_parse_size_ratio() -> None:
    parsed = parse_size("16:9")
    assert isinstance(parsed, Ratio) and parsed.label == "16:9" and parsed.value == pytest.approx(16 / 9)


@pytest.mark.parametrize("text", ["0x5", "abc", "20000x10", "10x0", "-5x5", "", "1024", "16:0"])
def test_parse_size_rejects_with_param(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_size(text)
    assert info.value.param == "size" and info.value.status == 400


def test_nearest_ratio_is_log_scale() -> None:
    assert nearest_ratio(7.0, ["4:1", "8:1"]) == "8:1"  # linear distance would pick neither better; log picks 8:1
    assert nearest_ratio(5.0, ["4:1", "8:1"]) == "4:1"
    assert nearest_ratio(1.5, ["1:1", "16:9", "4:3"]) == "4:3"
    assert nearest_ratio(0.5, ["9:16", "3:4", "1:1"]) == "9:16"


@pytest.mark.parametrize(
    ("text", "megapixels"), [("1K", 1.0), ("0.5K", 0.25), ("2k", 4.0), ("4K", 16.0), ("0.25", 0.25), ("1", 1.0)]
)
def test_parse_resolution(text: str, megapixels: float) -> None:
    assert parse_resolution(text) == pytest.approx(megapixels)


@pytest.mark.parametrize("text", ["big", "0K", "-1", "K", "0." + "0" * 200 + "1K", "9" * 400, "9" * 400 + "K", "1e3"])
def test_parse_resolution_rejects(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_resolution(text)
    assert info.value.param == "resolution"


@pytest.mark.parametrize(
    ("ratio", "resolution", "expected"),
    [
        ("4:3", "1K", Size(1183, 887)),
        ("1:1", "1K", Size(1024, 1024)),
        ("3:4", "1K", Size(887, 1182)),
        ("9:16", "1K", Size(768, 1365)),
        ("16:9", "1K", Size(1365, 768)),
        ("1:1", "2K", Size(2048, 2048)),
        ("1:1", "0.25", Size(512, 512)),
        ("1:1", "4K", Size(2048, 2048)),  # nearest offered tier: 2K
        ("21:9", "1K", Size(1365, 768)),  # nearest offered ratio: 16:9
    ],
)
def test_reference_model_grid(ratio: str, resolution: str, expected: Size) -> None:
    target = resolve_target(size=None, aspect_ratio=ratio, resolution=resolution, presets=QWEN_PRESETS)
    assert target is not None and target.size == expected and target.preset


def test_size_wins_over_aspect_ratio_and_resolution() -> None:
    target = resolve_target(size="800x600", aspect_ratio="9:16", resolution="2K", presets=QWEN_PRESETS)
    assert target is not None and target.size == Size(800, 600) and not target.preset and target.ratio == "4:3"


def test_size_ratio_behaves_as_aspect_ratio() -> None:
    by_size = resolve_target(size="16:9", aspect_ratio=None, resolution=None, presets=QWEN_PRESETS)
    by_ratio = resolve_target(size=None, aspect_ratio="16:9", resolution=None, presets=QWEN_PRESETS)
    assert by_size == by_ratio and by_size is not None and by_size.size == Size(1365, 768)


def test_auto_and_nothing_mean_model_default() -> None:
    assert resolve_target(size="auto", aspect_ratio="16:9", resolution="2K", presets=QWEN_PRESETS) is None
    assert resolve_target(size=None, aspect_ratio=None, resolution=None, presets=QWEN_PRESETS) is None
    assert resolve_target(size=None, aspect_ratio="auto", resolution=None, presets=QWEN_PRESETS) is None


def test_resolution_alone_keeps_the_input_shape() -> None:
    target = resolve_target(
        size=None, aspect_ratio=None, resolution="2K", presets=QWEN_PRESETS, input_size=Size(1600, 900)
    )
    assert target is not None and target.ratio == "16:9" and target.size == Size(2730, 1536)
    default = resolve_target(size=None, aspect_ratio=None, resolution="0.5K", presets=QWEN_PRESETS)
    assert default is not None and default.size == Size(512, 512)
