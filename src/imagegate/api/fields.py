"""Scalar request fields -> a validated `ImageRequest` (`build_request`), shared by every body form.

JSON values are checked as they are; multipart/urlencoded values arrive as strings (`form=True`)
and are coerced per field. `None` and `""` mean "not given".

Known fields
    prompt (required, at most `limits.max_prompt_chars`), model, n (1..MAX_N), size, aspect_ratio,
    resolution ("auto" = not given), response_format, output_format ("jpg" = "jpeg"),
    output_compression (0..100), quality (QUALITIES), background (BACKGROUNDS), negative_prompt,
    seed, cfg_scale (alias guidance_scale; both given must agree), num_inference_steps (>= 1),
    user, stream, partial_images (0..3), moderation (MODERATIONS), style (STYLES), input_fidelity
    (INPUT_FIDELITIES). Enum values are OpenAI's (case-insensitive); anything else is a 400
    `invalid_value` naming the field.
Images
    the mask, when given, must have the dimensions of the (first) image (400 `invalid_value`,
    param `mask`); unfetched URL images are checked once the gateway holds their bytes.
Extras
    unknown fields go to `ImageRequest.extra`: JSON values as they are. Form strings: "true"/"false"
    -> bool, integer and decimal literals -> numbers, anything else stays a string; form names
    `key[sub]` -> {"key": {"sub": ...}}, repeated `key[]` -> a list, `key[0]`, `key[1]` -> a list

The error constructors at the end are shared with `api.parsing`, so both speak with one voice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, cast

from imagegate.core.errors import InvalidRequest
from imagegate.core.request import (
    ImageRequest,
    InputImage,
    Operation,
    OutputFormat,
    ResponseFormat,
    check_mask_size,
)
from imagegate.core.sizes import parse_aspect_ratio, parse_resolution, parse_size
from imagegate.settings import LimitsSettings

__all__ = [
    "BACKGROUNDS",
    "INPUT_FIDELITIES",
    "MAX_N",
    "MODERATIONS",
    "QUALITIES",
    "STYLES",
    "build_request",
    "duplicate_parameter",
    "invalid_type",
    "json_type_name",
    "missing_parameter",
]

MAX_N = 10
_RESPONSE_FORMATS = ("url", "b64_json")
_OUTPUT_FORMATS = ("png", "jpeg", "webp", "gif", "avif")
BACKGROUNDS = ("transparent", "opaque", "auto")
# OpenAI's values: gpt-image (low/medium/high/auto), dall-e-3 (standard/hd), newer SDKs (xhigh/max).
QUALITIES = ("auto", "low", "medium", "high", "standard", "hd", "xhigh", "max")
STYLES = ("vivid", "natural")  # dall-e-3
MODERATIONS = ("auto", "low")
INPUT_FIDELITIES = ("high", "low")
_INT = re.compile(r"\A[+-]?\d{1,20}\Z", re.ASCII)
_FIELD_NAME = re.compile(r"\A[A-Za-z0-9_.\-]{1,64}\Z")  # safe in logs and the x-imagegate-params header
_FORM_INT = re.compile(r"\A-?(?:0|[1-9]\d{0,19})\Z", re.ASCII)
_FORM_FLOAT = re.compile(r"\A-?(?:0|[1-9]\d{0,19})\.\d{1,20}\Z", re.ASCII)
_NESTED = re.compile(r"\A([^\[\]]+)((?:\[[^\[\]]*\])+)\Z")
_INDEX = re.compile(r"[0-9]{1,4}")
# Fields the gateway models itself (everything else is an extra). `image`/`images`/`mask` are
# read separately.
_KNOWN = frozenset(
    {
        "prompt", "model", "n", "size", "aspect_ratio", "resolution", "response_format", "output_format",
        "output_compression", "quality", "background", "negative_prompt", "seed", "cfg_scale",
        "guidance_scale", "num_inference_steps", "user", "stream", "partial_images", "moderation",
        "style", "input_fidelity", "image", "images", "mask",
    }
)  # fmt: skip


def build_request(
    operation: Operation,
    fields: Mapping[str, Any],
    *,
    limits: LimitsSettings,
    default_model: str,
    images: list[InputImage] | None = None,
    mask: InputImage | None = None,
    form: bool = False,
) -> ImageRequest:
    """Validate the scalar fields (JSON values, or strings when `form`) into an ImageRequest.

    `None` and `""` mean "not given". Unknown fields become `extra` (JSON values as they are;
    form strings coerced conservatively, `key[sub]` nested)."""
    f = _Fields(fields, form=form)
    prompt = f.string("prompt")
    if prompt is None or not prompt.strip():
        raise missing_parameter("prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequest(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{limits.max_prompt_chars}, but got a string with length {len(prompt)} instead.",
            param="prompt",
            code="string_above_max_length",
        )
    size = f.string("size")
    if size is not None:
        parse_size(size)
        size = size.strip()
    aspect_ratio = f.string("aspect_ratio")
    if aspect_ratio is not None and aspect_ratio.strip().lower() != "auto":
        parse_aspect_ratio(aspect_ratio)
    resolution = f.string("resolution")
    if resolution is not None and resolution.strip().lower() == "auto":
        resolution = None  # "the model chooses" is what an absent resolution means
    elif resolution is not None:
        parse_resolution(resolution)
    cfg_scale = f.number("cfg_scale")
    guidance_scale = f.number("guidance_scale")
    if cfg_scale is not None and guidance_scale is not None and cfg_scale != guidance_scale:
        raise InvalidRequest(
            f"'cfg_scale' ({cfg_scale}) and its alias 'guidance_scale' ({guidance_scale}) disagree; send one of them.",
            param="guidance_scale",
        )
    if images and mask is not None:
        check_mask_size(images[0], mask)
    request = ImageRequest(
        operation=operation,
        prompt=prompt,
        model=f.string("model") or default_model,
        images=list(images or []),
        mask=mask,
        n=f.integer("n", lo=1, hi=MAX_N) or 1,
        size=size,
        aspect_ratio=aspect_ratio,
        resolution=resolution,
        response_format=_as_response_format(f.choice("response_format", _RESPONSE_FORMATS)),
        output_format=_as_output_format(f.choice("output_format", _OUTPUT_FORMATS, aliases={"jpg": "jpeg"})),
        output_compression=f.integer("output_compression", lo=0, hi=100),
        quality=f.choice("quality", QUALITIES),
        background=f.choice("background", BACKGROUNDS),
        negative_prompt=f.string("negative_prompt"),
        seed=f.integer("seed", lo=0, hi=2**63 - 1),
        cfg_scale=cfg_scale if cfg_scale is not None else guidance_scale,
        num_inference_steps=f.integer("num_inference_steps", lo=1),
        user=f.string("user"),
        stream=bool(f.boolean("stream")),
        partial_images=f.integer("partial_images", lo=0, hi=3),
        moderation=f.choice("moderation", MODERATIONS),
        style=f.choice("style", STYLES),
        input_fidelity=f.choice("input_fidelity", INPUT_FIDELITIES),
    )
    request.extra = f.extras()
    return request


# -- scalar fields ---------------------------------------------------------------------------------


class _Fields:
    """Takes fields out of a mapping, coercing and validating; what is left becomes `extra`.
    (A request asks for some twenty fields, most of them absent: each getter pops inline.)"""

    def __init__(self, raw: Mapping[str, Any], *, form: bool) -> None:
        self._form = form
        self._raw: dict[str, Any] = {}
        self._nested: dict[str, Any] = {}
        for key, value in raw.items():
            if value is None or value == "":
                continue
            m = _NESTED.match(key) if form else None
            if m is None:
                self._raw[key] = value
                continue
            if m.group(1) in _KNOWN:
                raise invalid_type(m.group(1), "a single value", {})
            path = re.findall(r"\[([^\[\]]*)\]", m.group(2))
            _set_nested(self._nested, key, m.group(1), path, _coerce_form(value))

    def string(self, name: str) -> str | None:
        value = self._raw.pop(name, None)
        if value is not None and not isinstance(value, str):
            raise invalid_type(name, "a string", value)
        return value

    def integer(self, name: str, *, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self._raw.pop(name, None)
        if value is None:
            return None
        if isinstance(value, str) and _INT.match(value.strip()):
            number = int(value.strip())
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        else:
            raise invalid_type(name, "an integer", value)
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else (
                f"at least {lo}" if lo is not None else f"at most {hi}")  # fmt: skip
            raise InvalidRequest(f"Invalid value: {number}. '{name}' must be {bounds}.", param=name)
        return number

    def number(self, name: str) -> float | None:
        value = self._raw.pop(name, None)
        if value is None:
            return None
        try:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError
            number = float(value)
        except ValueError:
            raise invalid_type(name, "a number", value) from None
        if not math.isfinite(number):
            raise InvalidRequest(f"Invalid value: '{value}'. '{name}' must be a finite number.", param=name)
        return number

    def boolean(self, name: str) -> bool | None:
        value = self._raw.pop(name, None)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0"):
            return False
        raise invalid_type(name, "a boolean ('true' or 'false')", value)

    def choice(self, name: str, allowed: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str | None:
        if name not in self._raw:
            return None
        value = self.string(name)
        if value is None:
            return None
        key = value.strip().lower()
        key = (aliases or {}).get(key, key)
        if key not in allowed:
            listed = ", ".join(f"'{a}'" for a in allowed[:-1]) + f" and '{allowed[-1]}'"
            raise InvalidRequest(f"Invalid value: '{value}'. Supported values are: {listed}.", param=name)
        return key

    def extras(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in (*self._raw, *self._nested):
            if not _FIELD_NAME.match(key):
                shown = key.encode("unicode_escape").decode("ascii")[:80]  # no control characters
                raise InvalidRequest(
                    f"Unknown parameter name '{shown}': names are 1-64 characters of letters, digits and _ . -",
                    param=shown,
                    code="unknown_parameter",
                )
        for key, value in self._raw.items():
            out[key] = _coerce_form(value) if self._form else value
        for key, value in self._nested.items():
            if key in out:
                raise duplicate_parameter(key)
            out[key] = _listify(value)
        return out


def _coerce_form(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if _FORM_INT.match(value):
        return int(value)
    if _FORM_FLOAT.match(value):
        return float(value)
    return value


def _set_nested(target: dict[str, Any], name: str, key: str, path: list[str], value: Any) -> None:
    """Place `value` of the form field `name` (= `key[path0][path1]...`) into `target`."""
    if "" in path[:-1]:
        raise InvalidRequest(f"Unsupported parameter name '{name}': '[]' may only come last.", param=key)
    append = path[-1] == ""
    keys = [key, *(path[:-1] if append else path)]
    node = target
    for part in keys[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise duplicate_parameter(key)
        node = child
    last = keys[-1]
    if append:
        items = node.setdefault(last, [])
        if not isinstance(items, list):
            raise duplicate_parameter(key)
        items.append(value)
    elif last in node:
        raise duplicate_parameter(key)
    else:
        node[last] = value


def _listify(value: Any) -> Any:
    """`{"0": a, "1": b}` (from `key[0]`, `key[1]`) -> `[a, b]`; recursively."""
    if isinstance(value, list):
        return [_listify(v) for v in value]
    if not isinstance(value, dict):
        return value
    items = {k: _listify(v) for k, v in value.items()}
    if items and all(_INDEX.fullmatch(k) for k in items) and sorted(map(int, items)) == list(range(len(items))):
        return [items[str(i)] for i in range(len(items))]
    return items


def _as_response_format(value: str | None) -> ResponseFormat | None:
    return cast("ResponseFormat | None", value)  # already checked against _RESPONSE_FORMATS


def _as_output_format(value: str | None) -> OutputFormat | None:
    return cast("OutputFormat | None", value)  # already checked against _OUTPUT_FORMATS


# -- errors ----------------------------------------------------------------------------------------


def missing_parameter(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def duplicate_parameter(param: str) -> InvalidRequest:
    return InvalidRequest(
        f"Duplicate parameter: '{param}'. You provided multiple values for this parameter, "
        "whereas only one is allowed.",
        param=param,
        code="duplicate_parameter",
    )


def invalid_type(param: str, expected: str, value: Any) -> InvalidRequest:
    shown = f"'{value}'" if isinstance(value, str) else json_type_name(value)
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {shown} instead.", param=param, code="invalid_type"
    )


def json_type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else "null"
