"""Parameter tables of an OpenAI-compatible Images API upstream (any model id: one table per operation).

OpenAI's own parameters go through unchanged:
- `image` -> repeated `image[]` multipart parts (bytes) or JSON `images: [{"image_url"}]` (URL inputs);
  `mask` -> the `mask` part (edits only)
- `n` -> `n`, natively up to 10 per call (more are fanned out by the gateway)
- `size` -> `size` as `WxH` from the gateway's size target, or `auto`
- `quality`, `background`, `moderation`, `style`, `input_fidelity`, `user` passthrough
- `output_format` png/jpeg/webp passthrough; gif/avif emulated (sends png; the gateway converts)
- `output_compression` passthrough (0-100)
- `seed`, `negative_prompt`, `cfg_scale`, `num_inference_steps` and fields the gateway does not model are
  passed through: the upstream validates them (OpenAI answers 400 `unknown_parameter`; compatible servers
  such as another imagegate may honour them)
- options of fal and Replicate models are ignored, so a request that falls back to OpenAI still runs
- `response_format` is the gateway's: the upstream is always asked for the bytes (see `DALLE_MODELS`)
"""

from __future__ import annotations

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
from imagegate.core.sizes import SizePresets, SizeTarget

__all__ = ["DALLE_MODELS", "EDIT", "GENERATE", "MAX_N", "OPENAI_PRESETS", "OTHER_PROVIDER_OPTIONS", "to_openai_size"]

MAX_N = 10
# Models that accept `response_format` (exact ids; GPT image models reject it with 400 unknown_parameter).
DALLE_MODELS: frozenset[str] = frozenset({"dall-e-2", "dall-e-3"})
# Options of fal and Replicate models, which OpenAI would reject as unknown parameters.
OTHER_PROVIDER_OPTIONS = ("acceleration", "enable_safety_checker", "sync_mode", "go_fast", "disable_safety_checker")
# The sizes every GPT image model accepts, so an `aspect_ratio` request resolves to a valid `size`.
OPENAI_PRESETS = SizePresets(base={"1:1": (1024, 1024), "3:2": (1536, 1024), "2:3": (1024, 1536)})


def to_openai_size(target: SizeTarget | None, _: BuildContext) -> str:
    """The gateway's size target -> `WxH`; `auto` -> `auto`."""
    return "auto" if target is None else f"{target.width}x{target.height}"


def _table(*, edit: bool) -> ParamTable:
    inputs: tuple[Rule, ...] = (
        (passthrough("image"), passthrough("mask"))
        if edit
        else (
            reject("image", reason="generations take no input image: use /v1/images/edits"),
            reject("mask", reason="generations take no mask"),
        )
    )
    return ParamTable(
        rules=(
            passthrough("prompt", type=str),
            *inputs,
            rename("n", to="n", type=int, min=1, batch=MAX_N),
            convert("size", to="size", fn=to_openai_size, reason="WxH of the gateway's size target, or auto"),
            passthrough("output_format", when=one_of("png", "jpeg", "webp")),
            emulate(
                "output_format",
                when=one_of("gif", "avif"),
                send={"output_format": "png"},
                reason="the upstream writes png; the gateway converts",
            ),
            passthrough("output_compression", type=int, min=0, max=100),
            passthrough("quality", type=str),
            passthrough("background", type=str),
            passthrough("moderation", type=str),
            passthrough("style", type=str),
            passthrough("input_fidelity", type=str),
            passthrough("user", type=str),
            passthrough("seed", type=int),
            passthrough("negative_prompt", type=str),
            passthrough("cfg_scale", type=float),
            passthrough("num_inference_steps", type=int),
            *(
                ignore(name, reason="an option of fal or Replicate models, not of the Images API")
                for name in OTHER_PROVIDER_OPTIONS
            ),
        ),
        unknown=Mode.PASSTHROUGH,
        unknown_reason="forwarded as-is; the upstream validates it",
    )


EDIT = _table(edit=True)
GENERATE = _table(edit=False)
