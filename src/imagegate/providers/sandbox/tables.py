"""Parameter tables of the offline sandbox models. Same interpreter, same rules as paid providers.

- `size` -> `size` `{width, height}` (the sandbox renders or resizes to exactly that size)
- `n` -> `num_images` (up to 4 per call; more are fanned out by the gateway)
- `output_format` png/jpeg/webp passthrough; gif/avif emulated (the sandbox sends png, the gateway converts)
- `mask` passthrough (OpenAI semantics: alpha-0 areas are edited)
"""

from __future__ import annotations

from imagegate.core.params import (
    BuildContext,
    Mode,
    ParamTable,
    convert,
    emulate,
    ignore,
    one_of,
    passthrough,
    reject,
    rename,
)
from imagegate.core.sizes import SizeTarget

__all__ = ["EDIT", "GENERATE", "MODELS", "to_sandbox_size"]


def to_sandbox_size(target: SizeTarget | None, _: BuildContext) -> dict[str, int] | None:
    """A size target -> `{"width", "height"}`; `auto` -> not sent (edits keep the input's size)."""
    return None if target is None else {"width": target.width, "height": target.height}


_NO_DIFFUSION = "the sandbox is not a diffusion model"


def _table(*, edit: bool) -> ParamTable:
    return ParamTable(
        rules=(
            passthrough("prompt", type=str),
            rename("image", to="images") if edit else reject("image", reason="generations take no input image"),
            passthrough("mask") if edit else reject("mask", reason="generations take no mask"),
            rename("n", to="num_images", batch=4),
            convert("size", to="size", fn=to_sandbox_size),
            passthrough("output_format", when=one_of("png", "jpeg", "webp")),
            emulate("output_format", send={"output_format": "png"}),
            passthrough("output_compression", type=int, min=0, max=100),
            passthrough("seed", type=int),
            reject("background", when=one_of("transparent"), reason="the sandbox draws no transparency"),
            emulate("background"),
            ignore("quality", reason="the sandbox has one quality"),
            ignore("negative_prompt", reason=_NO_DIFFUSION),
            ignore("cfg_scale", reason=_NO_DIFFUSION),
            ignore("num_inference_steps", reason=_NO_DIFFUSION),
            ignore("user", reason="recorded in the gateway's logs only"),
            ignore("moderation", reason="the sandbox has no moderation"),
            ignore("style", reason="the sandbox has one style"),
            ignore("input_fidelity", reason="the sandbox edits the input as is"),
        ),
        unknown=Mode.IGNORED,
        unknown_reason="the sandbox has no provider-specific options",
    )


EDIT = _table(edit=True)
GENERATE = _table(edit=False)
MODELS: dict[str, dict[str, ParamTable]] = {
    "sandbox-edit": {"edit": EDIT},
    "sandbox-image": {"generate": GENERATE},
}


