"""Parameter tables of the Replicate Qwen models (schemas: replicate-protocol.md, section 6).

Shared by all four models:
- `n` -> emulated: one image per prediction (no `num_outputs`), the gateway runs n predictions
- `output_format` png/webp passthrough, jpeg -> `jpg`, gif/avif emulated (sends png; the gateway converts);
  png is always sent unless asked otherwise (Replicate's default is webp, OpenAI's is png)
- `output_compression` -> `output_quality` (0-100)
- `seed` (int), `go_fast`, `disable_safety_checker` (bool) passthrough
- `mask` rejected; `background` transparent rejected, opaque/auto emulated
- `quality`, `style`, `moderation`, `input_fidelity`, `user` ignored (stated reasons)
- fal-only options (`acceleration`, `enable_safety_checker`, `sync_mode`) ignored, so a request that falls
  back from fal still runs here
- other fields rejected: Replicate validates `input` against the model schema

Per model:
- qwen-image-edit-2511, qwen-image-edit-plus: `image` -> `image` (array);
  `size` -> nearest `aspect_ratio` of 1:1, 16:9, 9:16, 4:3, 3:4 (`auto` -> `match_input_image`)
- qwen-image-edit: `image` -> `image` (one string; more images are a 400); no `aspect_ratio`, so `size`
  is emulated by the gateway's resize
- qwen-image (generate): `size` -> nearest `aspect_ratio` of 1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3
  (`auto` -> not sent); `negative_prompt` passthrough, `cfg_scale` -> `guidance` (0-10),
  `num_inference_steps` (1-50), `enhance_prompt`, `image_size`, `strength`, LoRA fields passthrough

The exact WxH always comes from the gateway's resize of the model's output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from imagegate.core.params import (
    BuildContext,
    Mode,
    ParamTable,
    Rule,
    convert,
    emulate,
    ignore,
    one_of,
    passthrough,
    reject,
    rename,
)
from imagegate.core.sizes import SizeTarget, nearest_ratio

__all__ = [
    "EDIT_ASPECT_RATIOS",
    "IMAGE_ASPECT_RATIOS",
    "IMAGE_SIZES",
    "MODELS",
    "aspect_ratio_for",
]

EDIT_ASPECT_RATIOS: tuple[str, ...] = ("1:1", "16:9", "9:16", "4:3", "3:4")
IMAGE_ASPECT_RATIOS: tuple[str, ...] = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3")
IMAGE_SIZES: tuple[str, ...] = ("optimize_for_quality", "optimize_for_speed")
MATCH_INPUT = "match_input_image"
FAL_ONLY = ("acceleration", "enable_safety_checker", "sync_mode")
_RESIZED = "the gateway resizes the output to the exact WxH"


def aspect_ratio_for(
    ratios: Sequence[str], *, auto: str | None
) -> Callable[[SizeTarget | None, BuildContext], str | None]:
    """A `size` converter: the target's W/H -> the nearest of `ratios`; `auto` (None) -> `auto`."""

    def to_aspect_ratio(target: SizeTarget | None, _: BuildContext) -> str | None:
        return auto if target is None else nearest_ratio(target.width / target.height, ratios)

    return to_aspect_ratio


def _jpg(_value: Any, _ctx: BuildContext) -> str:
    return "jpg"


def _first(refs: Sequence[str], _ctx: BuildContext) -> str:
    return refs[0]


def _shared(*, model_has: str) -> tuple[Rule, ...]:
    """Rules every Qwen model on Replicate has in common."""
    return (
        passthrough("prompt", type=str),
        emulate("n", reason="one image per prediction (no num_outputs): the gateway runs n predictions"),
        passthrough("output_format", when=one_of("png", "webp")),
        convert("output_format", to="output_format", fn=_jpg, when=one_of("jpeg"), reason="Replicate calls it jpg"),
        emulate(
            "output_format",
            when=one_of("gif", "avif"),
            send={"output_format": "png"},
            reason="the model writes png; the gateway converts",
        ),
        rename("output_compression", to="output_quality", type=int, min=0, max=100),
        passthrough("seed", type=int),
        passthrough("go_fast", type=bool),
        passthrough("disable_safety_checker", type=bool),
        reject("mask", reason=f"{model_has} takes no mask: describe the region to change in the prompt"),
        reject("background", when=one_of("transparent"), reason="the model cannot produce transparency"),
        emulate("background", when=one_of("opaque", "auto"), reason="the model's outputs are always opaque"),
        ignore("quality", reason="the model has one quality level"),
        ignore("style", reason="a dall-e-3 option; describe the style in the prompt"),
        ignore("moderation", reason="Replicate applies its own moderation (see disable_safety_checker)"),
        ignore("input_fidelity", reason="the model always conditions on the full input images"),
        ignore("user", reason="Replicate has no end-user field; recorded in the gateway's logs only"),
        *(ignore(name, reason="fal-only option") for name in FAL_ONLY),
    )


_EDIT_ONLY = (
    reject("negative_prompt", reason="the edit model has no negative prompt"),
    reject("cfg_scale", reason="the edit model has no guidance setting"),
    reject("num_inference_steps", reason="the edit model has no steps setting"),
)


def _table(*rules: Rule) -> ParamTable:
    return ParamTable(
        rules=rules,
        unknown=Mode.REJECTED,
        unknown_reason="Replicate validates input against the model schema.",
        fixed={"output_format": "png"},
    )


def _multi_image_edit() -> ParamTable:
    """qwen-image-edit-2511 and qwen-image-edit-plus (same schema)."""
    return _table(
        passthrough("image"),
        convert(
            "size",
            to="aspect_ratio",
            fn=aspect_ratio_for(EDIT_ASPECT_RATIOS, auto=MATCH_INPUT),
            reason=f"nearest of {', '.join(EDIT_ASPECT_RATIOS)} (auto: {MATCH_INPUT}); {_RESIZED}",
        ),
        *_EDIT_ONLY,
        *_shared(model_has="the edit model"),
    )


def _single_image_edit() -> ParamTable:
    """qwen-image-edit: one `image` string, no `aspect_ratio`."""
    return _table(
        convert("image", to="image", fn=_first, max_items=1, reason="the model takes exactly one image"),
        emulate("size", reason=f"the model has no aspect_ratio (it keeps the input's shape); {_RESIZED}"),
        *_EDIT_ONLY,
        *_shared(model_has="the edit model"),
    )


def _text_to_image() -> ParamTable:
    """qwen-image (text to image)."""
    return _table(
        reject("image", reason="a text-to-image route: send input images to /v1/images/edits"),
        convert(
            "size",
            to="aspect_ratio",
            fn=aspect_ratio_for(IMAGE_ASPECT_RATIOS, auto=None),
            reason=f"nearest of {', '.join(IMAGE_ASPECT_RATIOS)} (auto: the model's default); {_RESIZED}",
        ),
        passthrough("negative_prompt", type=str),
        rename("cfg_scale", to="guidance", type=float, min=0, max=10),
        passthrough("num_inference_steps", type=int, min=1, max=50),
        passthrough("enhance_prompt", type=bool),
        passthrough("image_size", type=str, choices=IMAGE_SIZES),
        passthrough("strength", type=float, min=0, max=1),
        passthrough("lora_weights", type=str),
        passthrough("lora_scale", type=float),
        passthrough("extra_lora_weights"),
        passthrough("extra_lora_scale"),
        passthrough("replicate_weights", type=str),
        *_shared(model_has="qwen-image"),
    )


MODELS: Mapping[str, Mapping[str, ParamTable]] = {
    "qwen/qwen-image-edit-2511": {"edit": _multi_image_edit()},
    "qwen/qwen-image-edit-plus": {"edit": _multi_image_edit()},
    "qwen/qwen-image-edit": {"edit": _single_image_edit()},
    "qwen/qwen-image": {"generate": _text_to_image()},
}
