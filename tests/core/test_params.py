"""Golden tests for the one table interpreter: every rule mode, fan-out, size precedence, unknown fields."""

from __future__ import annotations

from typing import Any

import pytest

from imagegate.core.errors import InvalidRequest, UnsupportedParameter
from imagegate.core.params import (
    KNOWN_PARAMS,
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
from imagegate.core.plan import apply_table
from imagegate.core.presets import QWEN_PRESETS
from imagegate.core.request import ImageRequest
from imagegate.core.sizes import SizeTarget, resolve_target


def _size(target: SizeTarget | None, _: BuildContext) -> Any:
    return None if target is None else {"width": target.width, "height": target.height}


def _rest(*covered: str) -> tuple[Rule, ...]:
    return tuple(ignore(p, reason="not relevant") for p in sorted(KNOWN_PARAMS - set(covered)))


RULES = (
    passthrough("prompt", type=str),
    rename("image", to="image_urls", max_items=3),
    rename("n", to="num_images", batch=4),
    convert("size", to="image_size", fn=_size),
    passthrough("output_format", when=one_of("png", "jpeg")),
    emulate("output_format", send={"output_format": "png"}),
    rename("cfg_scale", to="guidance_scale", type=float, min=1, max=20),
    passthrough("seed", type=int),
    reject("mask", reason="the model takes no mask"),
    passthrough("num_inference_steps", type=int, min=1, max=50),
    ignore("quality", reason="no quality setting"),
    passthrough("acceleration", choices=("none", "regular", "high")),
    passthrough("enable_safety_checker", type=bool),
)
TABLE = ParamTable(
    rules=RULES + _rest(*(r.param for r in RULES)),
    fixed={"acceleration": "regular"},
)


def plan_for(table: ParamTable = TABLE, **fields: Any) -> Any:
    extra = fields.pop("extra", {})
    request = ImageRequest(operation="edit", prompt="make it blue", model="m", extra=extra, **fields)
    target = resolve_target(
        size=request.size, aspect_ratio=request.aspect_ratio, resolution=request.resolution, presets=QWEN_PRESETS
    )
    ctx = BuildContext("edit", target=target)
    return apply_table(table, request, ctx, image_refs=["data:image/png;base64,AAAA"])


def test_minimal_request_golden_payload() -> None:
    plan = plan_for()
    assert plan.payloads == [
        {"prompt": "make it blue", "image_urls": ["data:image/png;base64,AAAA"], "acceleration": "regular",
         "num_images": 1}
    ]
    assert plan.images_per_call == [1]
    assert plan.header() == ""  # nothing optional was given, nothing to report


def test_every_mode_is_applied_and_reported() -> None:
    plan = plan_for(
        size="1024x768", n=2, output_format="webp", cfg_scale=4.5, seed=7, quality="high",
        extra={"acceleration": "high", "style_preset": "noir"},
    )
    assert plan.payloads == [
        {
            "prompt": "make it blue",
            "image_urls": ["data:image/png;base64,AAAA"],
            "image_size": {"width": 1024, "height": 768},
            "guidance_scale": 4.5,
            "seed": 7,
            "acceleration": "high",
            "style_preset": "noir",
            "output_format": "png",
            "num_images": 2,
        }
    ]
    assert plan.outcomes == {
        "size": Mode.CONVERTED,
        "output_format": Mode.EMULATED,
        "cfg_scale": Mode.RENAMED,
        "seed": Mode.PASSTHROUGH,
        "quality": Mode.IGNORED,
        "acceleration": Mode.PASSTHROUGH,
        "style_preset": Mode.PASSTHROUGH,
        "n": Mode.RENAMED,
    }
    assert plan.notes == {"quality": "no quality setting"}
    assert "size=converted" in plan.header() and "n=renamed" in plan.header()


def test_first_matching_rule_wins() -> None:
    assert plan_for(output_format="jpeg").payloads[0]["output_format"] == "jpeg"
    assert plan_for(output_format="jpeg").outcomes["output_format"] is Mode.PASSTHROUGH
    assert plan_for(output_format="avif").outcomes["output_format"] is Mode.EMULATED


def test_rejected_parameter_names_param_and_reason() -> None:
    with pytest.raises(UnsupportedParameter) as info:
        plan_for(mask=object())
    assert info.value.param == "mask" and "takes no mask" in info.value.message and info.value.status == 400


def test_ranges_choices_and_types_are_checked() -> None:
    with pytest.raises(InvalidRequest) as info:
        plan_for(cfg_scale=25.0)
    assert info.value.param == "cfg_scale"
    with pytest.raises(InvalidRequest) as info:
        plan_for(extra={"acceleration": "turbo"})
    assert info.value.param == "acceleration" and "'regular'" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        plan_for(extra={"enable_safety_checker": "maybe"})
    assert info.value.param == "enable_safety_checker"


def test_multipart_strings_are_coerced_by_declared_type() -> None:
    plan = plan_for(extra={"enable_safety_checker": "false"})
    assert plan.payloads[0]["enable_safety_checker"] is False


def test_max_items() -> None:
    request = ImageRequest(operation="edit", prompt="p", model="m")
    with pytest.raises(UnsupportedParameter) as info:
        apply_table(TABLE, request, BuildContext("edit"), image_refs=["a", "b", "c", "d"])
    assert info.value.param == "image"


def test_n_fans_out_above_batch_with_distinct_seeds() -> None:
    plan = plan_for(n=10, seed=100)
    assert plan.images_per_call == [4, 4, 2]
    assert [p["num_images"] for p in plan.payloads] == [4, 4, 2]
    assert [p["seed"] for p in plan.payloads] == [100, 104, 108]  # image i of the request has seed 100 + i
    assert plan.outcomes["n"] is Mode.EMULATED


def test_n_emulated_by_single_calls() -> None:
    rules = (emulate("n"), *(r for r in RULES if r.param != "n"))
    table = ParamTable(rules=rules + _rest(*(r.param for r in rules)))
    plan = plan_for(table, n=3)
    assert plan.images_per_call == [1, 1, 1]
    assert all("num_images" not in p for p in plan.payloads)
    assert "seed" not in plan.payloads[0]  # no seed given: none invented


def test_aspect_ratio_and_resolution_reach_the_size_rule() -> None:
    plan = plan_for(aspect_ratio="16:9", resolution="1K")
    assert plan.payloads[0]["image_size"] == {"width": 1365, "height": 768}
    assert plan.outcomes == {"aspect_ratio": Mode.CONVERTED, "resolution": Mode.CONVERTED}


def test_size_precedence_and_auto() -> None:
    assert plan_for(size="640x480", aspect_ratio="9:16").payloads[0]["image_size"] == {"width": 640, "height": 480}
    auto = plan_for(size="auto")
    assert "image_size" not in auto.payloads[0] and auto.outcomes["size"] is Mode.CONVERTED


def test_unknown_fields_policy() -> None:
    strict = ParamTable(rules=TABLE.rules, unknown=Mode.REJECTED, unknown_reason="schema is strict")
    with pytest.raises(UnsupportedParameter) as info:
        plan_for(strict, extra={"go_fast": True})
    assert info.value.param == "go_fast" and info.value.code == "unknown_parameter"
    quiet = ParamTable(rules=TABLE.rules, unknown=Mode.IGNORED, unknown_reason="no options")
    plan = plan_for(quiet, extra={"go_fast": True})
    assert "go_fast" not in plan.payloads[0] and plan.outcomes["go_fast"] is Mode.IGNORED


def test_gateway_params_are_reported_as_emulated() -> None:
    plan = plan_for(response_format="b64_json", stream=True)
    assert plan.outcomes["response_format"] is Mode.EMULATED and plan.outcomes["stream"] is Mode.EMULATED
    assert "response_format" not in plan.payloads[0]


def test_table_must_cover_every_known_param() -> None:
    with pytest.raises(ValueError, match="does not cover"):
        ParamTable(rules=(passthrough("prompt"),))


def test_describe_lists_every_param() -> None:
    described = TABLE.describe()
    assert set(described) >= KNOWN_PARAMS
    assert described["n"].startswith("renamed -> num_images (max 4 per call")
    assert described["output_format"].startswith("passthrough; otherwise emulated")


def test_fan_out_seeds_wrap_within_int64() -> None:
    plan = plan_for(n=10, seed=2**63 - 2)
    assert [p["seed"] for p in plan.payloads] == [2**63 - 2, 2, 6]
