"""fal parameter tables for the Qwen-Image family, and the pure conversions they use (no I/O).

Every table maps the gateway's parameters to the model's input JSON (fal-protocol.md §7, §8):

    prompt               -> prompt
    image                -> image_urls (list: 2511, plus) | image_url (one image: qwen-image-edit)
    mask                 rejected: the model takes no mask
    n                    -> num_images (1-4 per call; more are fanned out by the gateway, seeds offset)
    size                 -> image_size: a preset name when the target is exactly a fal preset
                            (square_hd 1024x1024, square 512x512, portrait_4_3 768x1024, ...),
                            else {width, height}; auto -> not sent (edits keep the input's size)
    output_format        -> output_format when the model has it (2511: png/jpeg/webp; others: png/jpeg),
                            else emulated: fal renders png and the gateway converts
    output_compression   emulated: fal renders png (lossless) and the gateway re-encodes
    background           transparent rejected (no alpha output); opaque/auto emulated (always opaque)
    negative_prompt      -> negative_prompt
    seed                 -> seed (int)
    cfg_scale            -> guidance_scale (range per model)
    num_inference_steps  -> num_inference_steps (range per model)
    moderation           low -> enable_safety_checker=false (OpenAI's "less restrictive filtering");
                            auto -> ignored (fal's checker is on by default)
    quality, style, input_fidelity, user: ignored, each with its reason
    acceleration, enable_safety_checker, sync_mode (fal options): typed and checked, then sent
    go_fast, disable_safety_checker, output_quality, ... : Replicate-only options, never sent to fal
    anything else        passed through (e.g. `loras` on LoRA endpoints)

`response_format` is the gateway's (it downloads or decodes outputs); it never reaches a table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from imagegate.core.errors import ContentPolicyViolation, InvalidRequest, UpstreamError
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
from imagegate.core.presets import QWEN_PRESETS
from imagegate.core.request import Operation
from imagegate.core.sizes import SizePresets, SizeTarget
from imagegate.providers.base import ProviderImage
from imagegate.providers.common import data_uri_mime

__all__ = [
    "FAL_IMAGE_SIZES",
    "REPLICATE_ONLY_OPTIONS",
    "TABLES",
    "first_image",
    "parse_output",
    "safety_checker_for_moderation",
    "size_presets",
    "to_fal_image_size",
]

# fal toolkit IMAGE_SIZE_PRESETS: preset name -> (width, height).
FAL_IMAGE_SIZES: Mapping[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
_PRESET_BY_PIXELS: Mapping[tuple[int, int], str] = {pixels: name for name, pixels in FAL_IMAGE_SIZES.items()}

# Options of Replicate's qwen models (replicate-protocol.md §6). A request that falls back from
# Replicate to fal may carry them; fal would reject or misread them, so they are never sent.
REPLICATE_ONLY_OPTIONS: tuple[str, ...] = (
    "go_fast",
    "disable_safety_checker",
    "output_quality",
    "enhance_prompt",
    "strength",
    "guidance",
    "lora_weights",
    "lora_scale",
    "extra_lora_weights",
    "extra_lora_scale",
    "replicate_weights",
)
# Replicate's qwen-image `image_size` enum; fal's `image_size` (a preset or {width,height}) passes through.
_REPLICATE_IMAGE_SIZES = ("optimize_for_quality", "optimize_for_speed")


# ---- conversions (pure) ---------------------------------------------------------------------------


def to_fal_image_size(target: SizeTarget | None, ctx: BuildContext) -> str | dict[str, int] | None:
    """size -> image_size: the preset name when the target is exactly one of fal's six presets,
    else `{"width", "height"}`; None (auto) -> not sent (edits keep the input image's size)."""
    if target is None:
        return None
    preset = _PRESET_BY_PIXELS.get((target.width, target.height))
    return preset if preset is not None else {"width": target.width, "height": target.height}


def first_image(refs: Sequence[str], ctx: BuildContext) -> str:
    """image -> image_url for single-image models (the table's max_items=1 rejects more)."""
    if not refs:
        raise InvalidRequest("This model needs one input image.", param="image")
    return refs[0]


def safety_checker_for_moderation(value: str, ctx: BuildContext) -> bool:
    """moderation=low -> enable_safety_checker=false (OpenAI: "less restrictive filtering")."""
    return value != "low"


def _is_replicate_image_size(value: Any) -> bool:
    return isinstance(value, str) and value in _REPLICATE_IMAGE_SIZES


def size_presets(model: str) -> SizePresets:
    """The size grid `aspect_ratio` + `resolution` resolve against: the Qwen-Image grid for every
    model here (fal itself takes any {width, height}, so the grid is the gateway's choice)."""
    if model not in _MODELS:
        raise KeyError(model)
    return QWEN_PRESETS


# ---- tables ---------------------------------------------------------------------------------------


def _qwen_table(
    *,
    image: Rule,
    steps: tuple[float | None, float | None],
    guidance: tuple[float | None, float | None],
    output_formats: tuple[str, ...],
    accelerations: tuple[str, ...],
    extra: tuple[Rule, ...] = (),
    fixed: Mapping[str, Any] | None = None,
) -> ParamTable:
    """The rules every fal Qwen-Image endpoint shares; the arguments are what differs per model."""
    return ParamTable(
        rules=(
            passthrough("prompt", type=str),
            image,
            reject("mask", reason="the model takes no mask; describe the region to change in the prompt"),
            rename("n", to="num_images", type=int, min=1, batch=4),
            convert("size", to="image_size", fn=to_fal_image_size),
            passthrough("output_format", when=one_of(*output_formats)),
            emulate("output_format", send={"output_format": "png"}, reason="fal renders png, the gateway converts"),
            emulate(
                "output_compression",
                send={"output_format": "png"},
                reason="fal has no compression setting; it renders lossless png and the gateway re-encodes",
            ),
            reject("background", when=one_of("transparent"), reason="the model cannot produce transparency"),
            emulate("background", when=one_of("opaque", "auto"), reason="outputs are always opaque"),
            passthrough("negative_prompt", type=str),
            passthrough("seed", type=int),
            rename("cfg_scale", to="guidance_scale", type=float, min=guidance[0], max=guidance[1]),
            passthrough("num_inference_steps", type=int, min=steps[0], max=steps[1]),
            ignore("quality", reason="the model has no quality setting (num_inference_steps trades speed for detail)"),
            ignore("style", reason="the model has no style setting; describe the style in the prompt"),
            convert(
                "moderation",
                to="enable_safety_checker",
                fn=safety_checker_for_moderation,
                when=one_of("low"),
                reason="low turns fal's safety checker off",
            ),
            ignore("moderation", when=one_of("auto"), reason="fal's safety checker is on by default"),
            ignore("input_fidelity", reason="the model always conditions on the full input images"),
            ignore("user", reason="end-user ids are not sent to fal"),
            # fal's own options, typed so multipart strings ("false") are coerced and checked.
            passthrough("acceleration", type=str, choices=accelerations),
            passthrough("enable_safety_checker", type=bool),
            passthrough("sync_mode", type=bool),
            ignore("image_size", when=_is_replicate_image_size, reason="Replicate-only option"),
            passthrough("image_size"),
            *extra,
            *(ignore(name, reason="Replicate-only option") for name in REPLICATE_ONLY_OPTIONS),
        ),
        unknown=Mode.PASSTHROUGH,
        unknown_reason="other fields are fal options (e.g. loras) and are sent as given",
        fixed=dict(fixed or {}),
    )


_IMAGE_LIST = rename("image", to="image_urls")
_IMAGE_ONE = convert("image", to="image_url", fn=first_image, max_items=1, reason="the model takes one image")
_NO_IMAGE = reject("image", reason="a text-to-image model takes no input image; use an edit model")

TABLES: Mapping[tuple[str, Operation], ParamTable] = {
    # §7: steps 1-50 (28), guidance 1-20 (4.5), png/jpeg/webp, acceleration none/regular/high.
    ("fal-ai/qwen-image-edit-2511", "edit"): _qwen_table(
        image=_IMAGE_LIST,
        steps=(1, 50),
        guidance=(1, 20),
        output_formats=("png", "jpeg", "webp"),
        accelerations=("none", "regular", "high"),
    ),
    # §7: plus's schema changed between snapshots (2509 schema: steps 2-100, guidance 0-20,
    # acceleration none/regular, png/jpeg; an older one: the 2511 schema). Ranges accept the union
    # (fal's own 422 names the field otherwise); output_format takes only what both have; the
    # defaults are sent explicitly so a schema change cannot change results.
    ("fal-ai/qwen-image-edit-plus", "edit"): _qwen_table(
        image=_IMAGE_LIST,
        steps=(1, 100),
        guidance=(0, 20),
        output_formats=("png", "jpeg"),
        accelerations=("none", "regular", "high"),
        fixed={
            "num_inference_steps": 50,
            "guidance_scale": 4.0,
            "negative_prompt": " ",
            "acceleration": "regular",
            "output_format": "png",
            "enable_safety_checker": True,
        },
    ),
    # §7: one `image_url`; ranges are not documented: only the lower bounds are checked here,
    # fal's 422 (mapped back to the OpenAI name) covers the rest.
    ("fal-ai/qwen-image-edit", "edit"): _qwen_table(
        image=_IMAGE_ONE,
        steps=(1, None),
        guidance=(0, None),
        output_formats=("png", "jpeg"),
        accelerations=("none", "regular", "high"),
    ),
    # §8: steps 2-250 (30), guidance 0-20 (2.5), png/jpeg, acceleration none/regular/high, use_turbo.
    ("fal-ai/qwen-image", "generate"): _qwen_table(
        image=_NO_IMAGE,
        steps=(2, 250),
        guidance=(0, 20),
        output_formats=("png", "jpeg"),
        accelerations=("none", "regular", "high"),
        extra=(passthrough("use_turbo", type=bool),),
    ),
}
_MODELS = frozenset(model for model, _ in TABLES)


# ---- output -----------------------------------------------------------------------------------


def parse_output(body: Any, *, safety_checker: bool = True) -> tuple[list[ProviderImage], int | None]:
    """Model output (`unoOutput`) -> images and seed.

    `images[].url` is a CDN URL, or a data URI with `sync_mode`: kept as the image's `url`, to be
    decoded in the image pool on delivery (`core.emulate`), not here on the event loop. With the
    safety checker on, images flagged in `has_nsfw_concepts` are blocked placeholders and are
    dropped; when every image is flagged (or `images` is empty and all flags are set) the request
    is a content policy violation. Whether fal answers a flagged output with an error or a black
    image is not documented, so both are handled (the error path is the 422 in transport.py)."""
    if not isinstance(body, dict):
        raise UpstreamError("fal returned a result that is not a JSON object.")
    raw = body.get("images")
    if not isinstance(raw, list):
        raise UpstreamError("fal returned a result without an `images` list.")
    flags_raw = body.get("has_nsfw_concepts")
    flags = [flag is True for flag in flags_raw] if isinstance(flags_raw, list) else []
    images: list[ProviderImage] = []
    flagged = 0
    for index, item in enumerate(raw):
        if safety_checker and index < len(flags) and flags[index]:
            flagged += 1
            continue
        images.append(_image(item))
    if not images:
        if flagged or (flags and all(flags)):
            raise ContentPolicyViolation("fal's safety checker flagged every output image.")
        raise UpstreamError("fal returned no images.")
    seed = body.get("seed")
    return images, seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _image(item: Any) -> ProviderImage:
    if not isinstance(item, dict) or not isinstance(item.get("url"), str):
        raise UpstreamError("fal returned an image without a url.")
    url: str = item["url"]
    content_type = item.get("content_type") if isinstance(item.get("content_type"), str) else None
    width, height = _int(item.get("width")), _int(item.get("height"))
    if url.startswith("data:"):
        # Only the header is checked here (cheap); the payload is decoded in the image pool.
        mime = data_uri_mime(url)
        return ProviderImage(url=url, content_type=content_type or mime, width=width, height=height)
    if not url.startswith(("https://", "http://")):
        raise UpstreamError("fal returned an image url that is neither http(s) nor a data URI.")
    return ProviderImage(url=url, content_type=content_type, width=width, height=height)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
