"""Golden payloads: an ImageRequest in, the exact fal JSON out (through apply_table)."""

from __future__ import annotations

from typing import Any

import pytest

from imagegate.core.errors import ContentPolicyViolation, InvalidRequest, UnsupportedParameter, UpstreamError
from imagegate.core.params import BuildContext, Mode
from imagegate.core.plan import Plan, apply_table
from imagegate.core.presets import QWEN_PRESETS
from imagegate.core.request import ImageRequest, InputImage, Operation
from imagegate.core.sizes import Size, resolve_target
from imagegate.providers.base import ProviderImage
from imagegate.providers.fal.tables import FAL_IMAGE_SIZES, TABLES, parse_output, size_presets

EDIT_2511 = "fal-ai/qwen-image-edit-2511"
EDIT_PLUS = "fal-ai/qwen-image-edit-plus"
EDIT_ONE = "fal-ai/qwen-image-edit"
GENERATE = "fal-ai/qwen-image"
REFS = ["https://v3.fal.media/files/a.png", "data:image/png;base64,AAAA"]
PLUS_FIXED = {
    "num_inference_steps": 50,
    "guidance_scale": 4.0,
    "negative_prompt": " ",
    "acceleration": "regular",
    "output_format": "png",
    "enable_safety_checker": True,
}


def plan(model: str, operation: Operation = "edit", *, refs: list[str] | None = None, **fields: Any) -> Plan:
    request = ImageRequest(operation=operation, prompt="make it blue", model="public-id", **fields)
    target = resolve_target(
        size=request.size, aspect_ratio=request.aspect_ratio, resolution=request.resolution, presets=QWEN_PRESETS,
        input_size=Size(640, 480) if operation == "edit" else None,
    )
    ctx = BuildContext(operation=operation, target=target, input_size=Size(640, 480) if operation == "edit" else None)
    mask_ref = "data:image/png;base64,BBBB" if request.mask is not None else None
    image_refs = (REFS if refs is None else refs) if operation == "edit" else ()
    return apply_table(TABLES[(model, operation)], request, ctx, image_refs=image_refs, mask_ref=mask_ref)


def payload(model: str, operation: Operation = "edit", **fields: Any) -> dict[str, Any]:
    result = plan(model, operation, **fields)
    assert len(result.payloads) == 1
    return result.payloads[0]


# ---- golden payloads ------------------------------------------------------------------------------


def test_2511_minimal_edit() -> None:
    assert payload(EDIT_2511) == {"prompt": "make it blue", "image_urls": REFS, "num_images": 1}


def test_2511_everything_native() -> None:
    result = plan(
        EDIT_2511,
        size="1024x1024",
        output_format="webp",
        negative_prompt="blurry",
        seed=7,
        cfg_scale=6,
        num_inference_steps=30,
        extra={"acceleration": "high", "enable_safety_checker": "false", "sync_mode": "true", "loras": [1]},
    )
    assert result.payloads == [
        {
            "prompt": "make it blue",
            "image_urls": REFS,
            "image_size": "square_hd",
            "output_format": "webp",
            "negative_prompt": "blurry",
            "seed": 7,
            "guidance_scale": 6.0,
            "num_inference_steps": 30,
            "acceleration": "high",
            "enable_safety_checker": False,
            "sync_mode": True,
            "loras": [1],
            "num_images": 1,
        }
    ]
    assert result.outcomes["size"] is Mode.CONVERTED
    assert result.outcomes["cfg_scale"] is Mode.RENAMED
    assert result.outcomes["loras"] is Mode.PASSTHROUGH


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("512x512", "square"),
        ("768x1024", "portrait_4_3"),
        ("576x1024", "portrait_16_9"),
        ("1024x768", "landscape_4_3"),
        ("1024x576", "landscape_16_9"),
        ("1183x887", {"width": 1183, "height": 887}),
        ("1000x1000", {"width": 1000, "height": 1000}),
    ],
)
def test_size_is_a_preset_only_when_exact(size: str, expected: Any) -> None:
    assert payload(EDIT_2511, size=size)["image_size"] == expected


def test_aspect_ratio_and_resolution_use_the_qwen_grid() -> None:
    assert payload(GENERATE, "generate", aspect_ratio="16:9", resolution="1K")["image_size"] == {
        "width": 1365,
        "height": 768,
    }
    assert payload(GENERATE, "generate", aspect_ratio="1:1")["image_size"] == "square_hd"  # 1024x1024 is a preset
    assert payload(GENERATE, "generate", aspect_ratio="4:3", resolution="2K")["image_size"] == {
        "width": 2366,
        "height": 1774,
    }


def test_auto_size_is_not_sent() -> None:
    assert "image_size" not in payload(EDIT_2511, size="auto")
    assert "image_size" not in payload(GENERATE, "generate", size="auto")
    assert "image_size" not in payload(GENERATE, "generate")


def test_n_batches_by_four_and_offsets_seeds() -> None:
    result = plan(EDIT_2511, n=6, seed=100)
    assert [(p["num_images"], p["seed"]) for p in result.payloads] == [(4, 100), (2, 104)]
    assert result.images_per_call == [4, 2]
    assert result.outcomes["n"] is Mode.EMULATED
    assert plan(EDIT_2511, n=3).payloads[0]["num_images"] == 3
    assert plan(EDIT_2511, n=3).outcomes["n"] is Mode.RENAMED


@pytest.mark.parametrize("model", [EDIT_PLUS, EDIT_ONE, GENERATE])
def test_webp_is_emulated_where_the_model_lacks_it(model: str) -> None:
    operation: Operation = "generate" if model == GENERATE else "edit"
    result = plan(model, operation, refs=REFS[:1], output_format="webp")
    assert result.payloads[0]["output_format"] == "png"
    assert result.outcomes["output_format"] is Mode.EMULATED


def test_output_compression_asks_for_lossless_png() -> None:
    result = plan(EDIT_2511, output_format="jpeg", output_compression=80)
    assert result.payloads[0]["output_format"] == "png"
    assert result.outcomes["output_compression"] is Mode.EMULATED


def test_plus_sends_explicit_defaults_and_user_values_win() -> None:
    assert payload(EDIT_PLUS) == {"prompt": "make it blue", "image_urls": REFS, "num_images": 1, **PLUS_FIXED}
    got = payload(
        EDIT_PLUS, num_inference_steps=20, cfg_scale=2.5, output_format="jpeg", extra={"acceleration": "none"}
    )
    assert got == {
        "prompt": "make it blue",
        "image_urls": REFS,
        "num_images": 1,
        **PLUS_FIXED,
        "num_inference_steps": 20,
        "guidance_scale": 2.5,
        "output_format": "jpeg",
        "acceleration": "none",
    }


def test_original_edit_takes_one_image_url() -> None:
    assert payload(EDIT_ONE, refs=REFS[:1]) == {"prompt": "make it blue", "image_url": REFS[0], "num_images": 1}
    with pytest.raises(UnsupportedParameter) as err:
        plan(EDIT_ONE, refs=REFS)
    assert err.value.param == "image" and err.value.status == 400


def test_generate_minimal_and_turbo() -> None:
    assert payload(GENERATE, "generate") == {"prompt": "make it blue", "num_images": 1}
    assert payload(GENERATE, "generate", extra={"use_turbo": "1"})["use_turbo"] is True


def test_moderation_low_turns_the_safety_checker_off() -> None:
    assert payload(EDIT_2511, moderation="low")["enable_safety_checker"] is False
    result = plan(EDIT_2511, moderation="auto")
    assert "enable_safety_checker" not in result.payloads[0]
    assert result.outcomes["moderation"] is Mode.IGNORED


def test_ignored_parameters_are_reported_with_a_reason() -> None:
    result = plan(EDIT_2511, quality="high", style="vivid", user="u1", input_fidelity="high", background="opaque")
    assert result.payloads[0] == {"prompt": "make it blue", "image_urls": REFS, "num_images": 1}
    for name in ("quality", "style", "user", "input_fidelity"):
        assert result.outcomes[name] is Mode.IGNORED and result.notes[name]
    assert result.outcomes["background"] is Mode.EMULATED


@pytest.mark.parametrize(
    "option",
    ["go_fast", "disable_safety_checker", "output_quality", "enhance_prompt", "guidance", "lora_weights"],
)
def test_replicate_only_options_never_reach_fal(option: str) -> None:
    result = plan(EDIT_2511, extra={option: True})
    assert option not in result.payloads[0]
    assert result.outcomes[option] is Mode.IGNORED and result.notes[option] == "Replicate-only option"


def test_replicate_image_size_enum_is_ignored_but_fal_image_size_passes() -> None:
    assert "image_size" not in payload(EDIT_2511, extra={"image_size": "optimize_for_speed"})
    assert payload(EDIT_2511, extra={"image_size": "square"})["image_size"] == "square"
    assert payload(EDIT_2511, size="1024x576", extra={"image_size": "square"})["image_size"] == "landscape_16_9"


# ---- rejections name the parameter --------------------------------------------------------------


def test_mask_is_rejected() -> None:
    with pytest.raises(UnsupportedParameter) as err:
        plan(EDIT_2511, mask=InputImage(data=b"x", format="png"))
    assert err.value.param == "mask" and "no mask" in err.value.message


def test_transparent_background_is_rejected() -> None:
    with pytest.raises(UnsupportedParameter) as err:
        plan(EDIT_2511, background="transparent")
    assert err.value.param == "background" and "transparency" in err.value.message


@pytest.mark.parametrize(
    ("model", "fields", "param"),
    [
        (EDIT_2511, {"num_inference_steps": 51}, "num_inference_steps"),
        (EDIT_2511, {"cfg_scale": 0.5}, "cfg_scale"),
        (EDIT_PLUS, {"num_inference_steps": 101}, "num_inference_steps"),
        (EDIT_2511, {"extra": {"acceleration": "turbo"}}, "acceleration"),
        (EDIT_2511, {"extra": {"enable_safety_checker": "maybe"}}, "enable_safety_checker"),
        (EDIT_2511, {"seed": "abc"}, "seed"),
        (EDIT_2511, {"moderation": "strict"}, "moderation"),
        (EDIT_2511, {"background": "purple"}, "background"),
    ],
)
def test_out_of_range_values_are_400s(model: str, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        plan(model, **fields)
    assert err.value.param == param and err.value.status == 400


def test_generation_steps_range() -> None:
    assert payload(GENERATE, "generate", num_inference_steps=250)["num_inference_steps"] == 250
    with pytest.raises(InvalidRequest):
        plan(GENERATE, "generate", num_inference_steps=1)


# ---- presets, matrix ---------------------------------------------------------------------------------


def test_size_presets_are_the_shared_qwen_grid() -> None:
    for model, _ in TABLES:
        assert size_presets(model) is QWEN_PRESETS
    with pytest.raises(KeyError):
        size_presets("fal-ai/flux/dev")
    assert QWEN_PRESETS.size_for("9:16", "1K") == Size(768, 1365)
    assert QWEN_PRESETS.tiers == ("0.5K", "1K", "2K")
    assert FAL_IMAGE_SIZES["square_hd"] == (1024, 1024)


def test_every_table_renders_a_support_matrix() -> None:
    for table in TABLES.values():
        matrix = table.describe()
        assert matrix["mask"].startswith("rejected")
        assert "max 4 per call" in matrix["n"]


# ---- output parsing -------------------------------------------------------------------------------


def test_parse_output_urls_and_seed() -> None:
    body = {
        "images": [{"url": "https://v3.fal.media/files/x.png", "width": 10, "height": 20, "content_type": "image/png"}],
        "seed": 5,
        "has_nsfw_concepts": [False],
    }
    assert parse_output(body) == (
        [ProviderImage(url="https://v3.fal.media/files/x.png", content_type="image/png", width=10, height=20)],
        5,
    )


def test_parse_output_keeps_data_uris_for_the_pool() -> None:
    images, seed = parse_output({"images": [{"url": "data:image/jpeg;base64,AAEC"}]})
    assert images == [ProviderImage(url="data:image/jpeg;base64,AAEC", content_type="image/jpeg")] and seed is None
    body = {"images": [{"url": "data:image/png;base64,AAEC", "content_type": "image/webp", "width": 3, "height": 4}]}
    assert parse_output(body)[0] == [
        ProviderImage(url="data:image/png;base64,AAEC", content_type="image/webp", width=3, height=4)
    ]
    # the payload is not decoded here: invalid base64 only fails on delivery (core.emulate, in the pool)
    assert parse_output({"images": [{"url": "data:;base64,!!"}]})[0] == [
        ProviderImage(url="data:;base64,!!", content_type="application/octet-stream")
    ]


@pytest.mark.parametrize("url", ["data:image/png,AAEC", "data:image/png;base64", "data:image/png;base64X,AA"])
def test_parse_output_rejects_malformed_data_uri_headers(url: str) -> None:
    with pytest.raises(UpstreamError, match="malformed data URI"):
        parse_output({"images": [{"url": url}]})


def test_parse_output_flags() -> None:
    flagged = {"images": [{"url": "https://x/a.png"}, {"url": "https://x/b.png"}], "has_nsfw_concepts": [True, False]}
    assert [i.url for i in parse_output(flagged)[0]] == ["https://x/b.png"]
    assert len(parse_output(flagged, safety_checker=False)[0]) == 2
    with pytest.raises(ContentPolicyViolation) as err:
        parse_output({"images": [{"url": "https://x/a.png"}], "has_nsfw_concepts": [True]})
    assert err.value.code == "content_policy_violation" and err.value.status == 400
    with pytest.raises(ContentPolicyViolation):
        parse_output({"images": [], "has_nsfw_concepts": [True]})


@pytest.mark.parametrize(
    "body", [{"images": []}, {}, [], {"images": [{"url": 3}]}, {"images": [{"url": "ftp://x"}]}]
)
def test_parse_output_without_images_is_an_upstream_error(body: Any) -> None:
    with pytest.raises(UpstreamError) as err:
        parse_output(body)
    assert err.value.status == 502 and err.value.fallback
