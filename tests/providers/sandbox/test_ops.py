from __future__ import annotations

import time

import pytest
from PIL import Image, ImageChops

from imagegate.providers.sandbox.ops import VOCABULARY, EditRefused, Operation, edit, generate, parse_operations


def _quadrants(size: int = 20) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    half = size // 2
    img.paste((255, 0, 0), (0, 0, half, half))
    img.paste((0, 255, 0), (half, 0, size, half))
    img.paste((0, 0, 255), (0, half, half, size))
    return img


def _names(prompt: str) -> list[str]:
    return [op.name for op in parse_operations(prompt)]


# -- parse_operations ----------------------------------------------------------------------------


def test_operations_follow_prompt_order_not_table_order() -> None:
    assert _names("Please INVERT it, then make it black and white and finally blur") == [
        "invert",
        "grayscale",
        "blur",
    ]
    assert _names("blur, invert, greyscale, invert") == ["blur", "invert", "grayscale", "invert"]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("rotate", Operation("rotate", 90.0)),
        ("rotate 45 degrees", Operation("rotate", 45.0)),
        ("Rotate 30 clockwise", Operation("rotate", -30.0)),
        ("rotate left", Operation("rotate", 90.0)),
        ("rotate right", Operation("rotate", -90.0)),
        ("blur", Operation("blur", 4.0)),
        ("blur 2.5 please", Operation("blur", 2.5)),
        ("posterize 2", Operation("posterize", 2.0)),
        ("flip", Operation("flip", 1.0)),
        ("flip horizontally", Operation("flip", 0.0)),
        ("mirror", Operation("flip", 0.0)),
        ("darker", Operation("darken", 0.7)),
    ],
)
def test_parse_reads_amounts(prompt: str, expected: Operation) -> None:
    assert parse_operations(prompt) == [expected]


def test_parse_matches_whole_words_only() -> None:
    assert parse_operations("an inverted pyramid, a flipper, a blurb, a photograph") == []


def test_vocabulary_lists_every_operation_with_a_description() -> None:
    names = [name for name, _ in VOCABULARY]
    assert len(names) == len(set(names))
    assert {"grayscale", "invert", "blur", "sharpen", "sepia", "rotate", "flip", "brighten", "darken",
            "posterize"} <= set(names)
    assert all(description for _, description in VOCABULARY)


# -- edit ----------------------------------------------------------------------------------------


def test_grayscale_makes_channels_equal() -> None:
    out = edit([_quadrants()], "grayscale").convert("RGB")
    red, green, blue = out.split()
    assert ImageChops.difference(red, green).getbbox() is None
    assert ImageChops.difference(green, blue).getbbox() is None
    assert out.getpixel((0, 0)) != out.getpixel((19, 19))  # still a picture, not a flat fill


def test_invert_of_known_pixels() -> None:
    out = edit([_quadrants()], "invert")
    assert out.getpixel((0, 0)) == (0, 255, 255)
    assert out.getpixel((19, 19)) == (0, 0, 0)


def test_invert_keeps_alpha() -> None:
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 77))
    assert edit([img], "negative").getpixel((0, 0)) == (245, 235, 225, 77)


def test_rotate_90_swaps_dimensions_and_moves_corners() -> None:
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))
    out = edit([img], "rotate 90")
    assert out.size == (10, 30)
    assert out.getpixel((0, 29)) == (255, 0, 0)  # counter-clockwise: top-left goes to bottom-left


def test_mirror_and_flip_move_known_pixel() -> None:
    assert edit([_quadrants()], "mirror").getpixel((0, 0)) == (0, 255, 0)
    assert edit([_quadrants()], "flip").getpixel((0, 0)) == (0, 0, 255)


def test_operations_are_applied_in_prompt_order() -> None:
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))
    rotated_then_mirrored = edit([img], "rotate 90 then mirror")
    mirrored_then_rotated = edit([img], "mirror then rotate 90")
    assert rotated_then_mirrored.getpixel((9, 19)) == (255, 0, 0)
    assert mirrored_then_rotated.getpixel((0, 0)) == (255, 0, 0)


def test_unknown_prompt_adds_caption_but_keeps_size() -> None:
    img = _quadrants(200)
    out = edit([img], "make it look like a watercolour painting")
    assert out.size == img.size
    assert out.getpixel((0, 0)) == img.getpixel((0, 0))  # top untouched
    diff = ImageChops.difference(out, img).getbbox()
    assert diff is not None and diff[1] >= 150  # changed only in a bar at the bottom


def test_several_images_are_combined_side_by_side() -> None:
    first, second = Image.new("RGB", (30, 20), (255, 0, 0)), Image.new("RGB", (50, 20), (0, 0, 255))
    out = edit([first, second], "invert")
    assert out.size == (80, 20)
    assert out.getpixel((0, 0)) == (0, 255, 255)
    assert out.getpixel((79, 0)) == (255, 255, 0)


def test_side_by_side_matches_first_image_height() -> None:
    first, second = Image.new("RGB", (30, 20)), Image.new("RGBA", (10, 40), (0, 0, 0, 0))
    out = edit([first, second], "invert")
    assert out.size == (35, 20)
    assert out.mode == "RGBA"


def test_mask_limits_edit_to_transparent_area() -> None:
    img = Image.new("RGB", (40, 40), (200, 100, 50))
    mask = Image.new("RGBA", (40, 40), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 20, 40))  # left half transparent = edit there
    out = edit([img], "invert", mask=mask).convert("RGB")
    assert out.getpixel((5, 20)) == (55, 155, 205)
    assert out.getpixel((35, 20)) == (200, 100, 50)


def test_mask_of_another_size_is_refused_never_stretched() -> None:
    with pytest.raises(EditRefused) as info:
        edit([Image.new("RGB", (40, 40))], "invert", mask=Image.new("RGBA", (20, 20)))
    assert info.value.param == "mask" and "20x20" in str(info.value)


def test_mask_covers_the_first_of_several_images_only() -> None:
    first, second = Image.new("RGB", (20, 10), (200, 100, 50)), Image.new("RGB", (20, 10), (200, 100, 50))
    keep_all = Image.new("RGBA", (20, 10), (0, 0, 0, 255))  # nothing of the first image is edited
    out = edit([first, second], "invert", mask=keep_all).convert("RGB")
    assert out.size == (40, 10)
    assert out.getpixel((5, 5)) == (200, 100, 50)  # first image: kept, as the mask says
    assert out.getpixel((35, 5)) == (55, 155, 205)  # second image: the mask says nothing about it


def test_mask_with_size_changing_operation_keeps_size() -> None:
    img = Image.new("RGB", (40, 20), (200, 100, 50))
    mask = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    assert edit([img], "rotate 90", mask=mask).size == (40, 20)


def test_mask_without_alpha_and_empty_input_are_rejected() -> None:
    with pytest.raises(ValueError, match="alpha"):
        edit([_quadrants()], "invert", mask=Image.new("RGB", (20, 20)))
    with pytest.raises(ValueError):
        edit([], "invert")


# -- generate ------------------------------------------------------------------------------------


def test_generate_is_deterministic_and_exact_size() -> None:
    first = generate("a lighthouse at dusk", seed=7, size=(320, 200))
    second = generate("a lighthouse at dusk", seed=7, size=(320, 200))
    assert first.size == (320, 200)
    assert first.mode == "RGB"
    assert first.tobytes() == second.tobytes()


def test_generate_depends_on_seed_and_prompt() -> None:
    base = generate("a lighthouse at dusk", seed=7, size=(128, 128)).tobytes()
    assert generate("a lighthouse at dusk", seed=8, size=(128, 128)).tobytes() != base
    assert generate("a lighthouse at dawn", seed=7, size=(128, 128)).tobytes() != base
    assert generate("a lighthouse at dusk", seed=None, size=(128, 128)).tobytes() != base


@pytest.mark.parametrize("size", [(1, 1), (7, 300), (1536, 1024)])
def test_generate_handles_any_size(size: tuple[int, int]) -> None:
    assert generate("x" * 500, seed=1, size=size).size == size


def test_generate_is_fast_at_1024() -> None:
    started = time.perf_counter()
    generate("a fast picture " * 10, seed=3, size=(1024, 1024))
    assert time.perf_counter() - started < 0.5  # ~25 ms measured; generous for slow CI


def test_generate_rejects_empty_size() -> None:
    with pytest.raises(ValueError):
        generate("x", seed=1, size=(0, 10))
