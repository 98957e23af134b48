"""api.parsing: HTTP request -> ImageRequest, exercised without an app (Starlette Requests built
from the exact bytes httpx would send)."""

from __future__ import annotations

import base64
import json
import random
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.requests import ClientDisconnect, Request
from tests.api.conftest import MAX_PIXELS, encode

from imagegate.api import parsing
from imagegate.api.parsing import (
    DEFAULT_EDIT_MODEL,
    DEFAULT_GENERATION_MODEL,
    build_request,
    parse_edit_request,
    parse_generation_request,
)
from imagegate.core.errors import GatewayError, InvalidRequest, PayloadTooLarge, UnsupportedParameter
from imagegate.core.fetch import GuardedFetcher
from imagegate.core.fetch import fetch_image as materialize
from imagegate.core.imaging import ImagePool
from imagegate.core.request import ImageRequest, InputImage
from imagegate.settings import FetchSettings, LimitsSettings

LIMITS = LimitsSettings(max_pixels=MAX_PIXELS, max_image_bytes=200_000, max_mask_bytes=50_000, max_prompt_chars=100)
PNG = encode("png")
JPEG = encode("jpeg")
WEBP = encode("webp")


@pytest.fixture
async def pool() -> AsyncIterator[ImagePool]:
    p = ImagePool(2)
    yield p
    p.close()


def as_starlette(request: httpx.Request, *, in_app: bool = True) -> Request:
    body = request.read()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    scope: dict[str, Any] = {
        "type": "http",
        "method": request.method,
        "path": request.url.path,
        "query_string": request.url.query,
        "headers": [(k.lower(), v) for k, v in request.headers.raw],
    }
    if in_app:
        scope["app"] = object()
    return Request(scope, receive)


def multipart(data: dict[str, Any] | None = None, files: list[tuple[str, Any]] | None = None) -> Request:
    return as_starlette(httpx.Request("POST", "http://test/v1/images/edits", data=data, files=files))


def json_request(body: Any, path: str = "/v1/images/edits") -> Request:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return as_starlette(
        httpx.Request("POST", f"http://test{path}", content=content, headers={"content-type": "application/json"})
    )


async def edit(pool: ImagePool, request: Request, limits: LimitsSettings = LIMITS) -> ImageRequest:
    return await parse_edit_request(request, limits=limits, pool=pool)


async def edit_error(pool: ImagePool, request: Request, limits: LimitsSettings = LIMITS) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await edit(pool, request, limits)
    return info.value


def build(fields: dict[str, Any], *, form: bool = False, operation: Any = "generate") -> ImageRequest:
    return build_request(operation, fields, limits=LIMITS, default_model="default-model", form=form)


def build_error(fields: dict[str, Any], *, form: bool = False) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        build(fields, form=form)
    return info.value


# -- scalar fields --------------------------------------------------------------------------------


def test_form_strings_are_coerced_per_field() -> None:
    req = build(
        {
            "prompt": "p",
            "n": "3",
            "output_compression": "80",
            "seed": "7",
            "num_inference_steps": "28",
            "partial_images": "2",
            "cfg_scale": "4.5",
            "stream": "true",
            "output_format": "JPG",
            "response_format": "b64_json",
            "background": "transparent",
            "quality": "HD",
            "size": " 1024x768 ",
            "aspect_ratio": "16:9",
            "resolution": "2K",
            "negative_prompt": "blur",
            "user": "u1",
            "moderation": "low",
            "style": "vivid",
            "input_fidelity": "high",
        },
        form=True,
    )
    assert (req.n, req.output_compression, req.seed, req.num_inference_steps, req.partial_images) == (3, 80, 7, 28, 2)
    assert req.cfg_scale == 4.5 and req.stream is True
    assert req.output_format == "jpeg" and req.response_format == "b64_json" and req.background == "transparent"
    assert req.quality == "hd"
    assert (req.size, req.aspect_ratio, req.resolution) == ("1024x768", "16:9", "2K")
    assert (req.negative_prompt, req.user, req.moderation, req.style, req.input_fidelity) == (
        "blur",
        "u1",
        "low",
        "vivid",
        "high",
    )
    assert req.extra == {}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": "x"}, "n"),
        ({"n": "0"}, "n"),
        ({"n": "11"}, "n"),
        ({"n": "1.5"}, "n"),
        ({"size": "0x5"}, "size"),
        ({"size": "abc"}, "size"),
        ({"size": "20000x10"}, "size"),
        ({"aspect_ratio": "wide"}, "aspect_ratio"),
        ({"aspect_ratio": "0:1"}, "aspect_ratio"),
        ({"resolution": "huge"}, "resolution"),
        ({"response_format": "jpeg"}, "response_format"),
        ({"output_format": "bmp"}, "output_format"),
        ({"output_compression": "101"}, "output_compression"),
        ({"output_compression": "-1"}, "output_compression"),
        ({"background": "green"}, "background"),
        ({"stream": "maybe"}, "stream"),
        ({"seed": "lucky"}, "seed"),
        ({"cfg_scale": "high"}, "cfg_scale"),
        ({"cfg_scale": "nan"}, "cfg_scale"),
        ({"num_inference_steps": "0"}, "num_inference_steps"),
        ({"partial_images": "4"}, "partial_images"),
        ({"cfg_scale": "3", "guidance_scale": "4"}, "guidance_scale"),
    ],
)
def test_bad_form_values_name_the_param(fields: dict[str, str], param: str) -> None:
    error = build_error({"prompt": "p", **fields}, form=True)
    assert error.status == 400 and error.param == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": True}, "n"),
        ({"n": 2.5}, "n"),
        ({"n": [1]}, "n"),
        ({"quality": 5}, "quality"),
        ({"prompt": 5}, "prompt"),
        ({"stream": "yes please"}, "stream"),
        ({"cfg_scale": True}, "cfg_scale"),
        ({"size": 1024}, "size"),
    ],
)
def test_bad_json_types_name_the_param(fields: dict[str, Any], param: str) -> None:
    error = build_error({"prompt": "p", **fields})
    assert error.param == param and error.code == "invalid_type"


def test_json_values_keep_their_types() -> None:
    req = build({"prompt": "p", "n": 2.0, "seed": 5, "stream": False, "cfg_scale": 7, "output_compression": "50"})
    assert (req.n, req.seed, req.stream, req.cfg_scale, req.output_compression) == (2, 5, False, 7.0, 50)


@pytest.mark.parametrize("prompt", [None, "", "   "])
def test_prompt_is_required(prompt: str | None) -> None:
    error = build_error({"prompt": prompt})
    assert error.param == "prompt" and error.code == "missing_required_parameter"


def test_prompt_length_is_limited() -> None:
    assert build({"prompt": "x" * LIMITS.max_prompt_chars}).prompt
    error = build_error({"prompt": "x" * (LIMITS.max_prompt_chars + 1)})
    assert error.param == "prompt" and str(LIMITS.max_prompt_chars) in error.message


def test_empty_strings_and_nulls_are_not_given() -> None:
    req = build({"prompt": "p", "n": "", "size": "", "model": "", "seed": None, "custom": "", "other": None}, form=True)
    assert req.n == 1 and req.size is None and req.seed is None and req.model == "default-model"
    assert req.extra == {}


def test_guidance_scale_is_an_alias_of_cfg_scale() -> None:
    assert build({"prompt": "p", "guidance_scale": "3.5"}, form=True).cfg_scale == 3.5
    assert build({"prompt": "p", "guidance_scale": 3, "cfg_scale": 3.0}).cfg_scale == 3.0
    assert "guidance_scale" not in build({"prompt": "p", "guidance_scale": 3}).extra


def test_resolution_auto_means_not_given_and_auto_sizes_are_kept() -> None:
    req = build({"prompt": "p", "resolution": "auto", "aspect_ratio": "auto", "size": "auto"})
    assert req.resolution is None and req.aspect_ratio == "auto" and req.size == "auto"


def test_model_defaults_differ_per_endpoint_and_are_not_checked() -> None:
    assert DEFAULT_EDIT_MODEL == "sandbox-edit" and DEFAULT_GENERATION_MODEL == "sandbox-image"
    assert build({"prompt": "p", "model": "no-such-model"}).model == "no-such-model"


def test_form_extras_are_coerced_conservatively_and_nested() -> None:
    fields: dict[str, Any] = {
        "prompt": "p",
        "enable_safety_checker": "false",
        "go_fast": "True",
        "num_images": "4",
        "output_quality": "0.75",
        "leading_zero": "007",
        "exponent": "1e5",
        "acceleration": "high",
        "svg[width]": "10",
        "svg[style][color]": "red",
        "loras[0]": "a",
        "loras[1]": "b",
        "tags[]": "x",
    }
    req = build(fields, form=True)
    assert req.extra == {
        "enable_safety_checker": False,
        "go_fast": True,
        "num_images": 4,
        "output_quality": 0.75,
        "leading_zero": "007",
        "exponent": "1e5",
        "acceleration": "high",
        "svg": {"width": 10, "style": {"color": "red"}},
        "loras": ["a", "b"],
        "tags": ["x"],
    }


def test_json_extras_pass_untouched() -> None:
    extra = {"acceleration": "regular", "sync_mode": True, "loras": [{"path": "x", "scale": 0.5}], "num": "4"}
    assert build({"prompt": "p", **extra}).extra == extra


def test_nested_known_field_and_nested_plain_collision_are_rejected() -> None:
    assert build_error({"prompt": "p", "n[a]": "1"}, form=True).param == "n"
    assert build_error({"prompt": "p", "svg": "1", "svg[a]": "2"}, form=True).code == "duplicate_parameter"


# -- multipart edits -------------------------------------------------------------------------------


async def test_multipart_images_in_sdk_order_with_sniffed_formats(pool: ImagePool) -> None:
    request = multipart(
        {"prompt": "p", "n": "2"},
        files=[
            ("image[1]", ("i1.webp", WEBP, "application/octet-stream")),
            ("image[]", ("b.jpg", JPEG, "image/png")),  # the declared type is ignored
            ("image", ("a.png", PNG, "application/octet-stream")),
            ("image[0]", ("i0.png", PNG, "image/png")),
        ],
    )
    req = await edit(pool, request)
    assert [(i.filename, i.format) for i in req.images] == [
        ("a.png", "png"),
        ("b.jpg", "jpeg"),
        ("i0.png", "png"),
        ("i1.webp", "webp"),
    ]
    assert req.images[0].data == PNG and (req.images[0].width, req.images[0].height) == (32, 24)
    assert req.operation == "edit" and req.model == DEFAULT_EDIT_MODEL and req.n == 2


async def test_multipart_mask_is_read_and_probed(pool: ImagePool) -> None:
    mask = encode("png", mode="RGBA")
    req = await edit(pool, multipart({"prompt": "p"}, files=[("image", ("a.png", PNG)), ("mask", ("m.png", mask))]))
    assert req.mask is not None and req.mask.data == mask and req.mask.format == "png"
    assert len(req.images) == 1


@pytest.mark.parametrize(
    ("data", "files", "param", "code"),
    [
        ({"prompt": "p"}, [], "image", "missing_required_parameter"),
        ({"prompt": "p", "image": "not-a-file"}, [("mask", ("m.png", PNG))], "image", "invalid_type"),
        ({"prompt": "p"}, [("image", ("a.png", b""))], "image", "invalid_image"),
        ({"prompt": "p"}, [("image", ("a.png", b"hello, I am text"))], "image", "invalid_image"),
        ({"prompt": "p"}, [("image", ("a.png", encode("png", 64, 64, noisy=True)[:-200]))], "image", "invalid_image"),
        ({"prompt": "p"}, [("image", ("a.png", encode("png", 1001, 1000)))], "image", "image_too_large"),
        ({"prompt": "p"}, [("image", ("a.png", PNG)), ("mask", ("m.png", b"junk"))], "mask", "invalid_image"),
        ({"prompt": "p"}, [("image", ("a.png", PNG)), ("mask", ("m.png", PNG)), ("mask", ("n.png", PNG))], "mask",
         "duplicate_parameter"),
        ({"prompt": "p"}, [("image", ("a.png", PNG)), ("markup", ("m.svg", b"<svg/>"))], "markup",
         "unsupported_parameter"),
        ({"prompt": "p"}, [("image[x]", ("a.png", PNG))], "image", "invalid_value"),
        ({"prompt": ["p", "q"]}, [("image", ("a.png", PNG))], "prompt", "duplicate_parameter"),
        ({}, [("image", ("a.png", PNG))], "prompt", "missing_required_parameter"),
    ],
)  # fmt: skip
async def test_multipart_bad_inputs(
    pool: ImagePool, data: Any, files: list[tuple[str, Any]], param: str, code: str
) -> None:
    error = await edit_error(pool, multipart(data, files))
    assert (error.status, error.param, error.code) == (400, param, code), error.message


async def test_text_image_message_says_a_file_was_expected(pool: ImagePool) -> None:
    error = await edit_error(pool, multipart({"prompt": "p", "image": "abc"}, [("mask", ("m.png", PNG))]))
    assert error.message.startswith("Invalid type for 'image': expected")
    assert "file" in error.message


async def test_too_many_pixels_names_the_limit(pool: ImagePool) -> None:
    error = await edit_error(pool, multipart({"prompt": "p"}, [("image", ("big.png", encode("png", 1001, 1000)))]))
    assert str(MAX_PIXELS) in error.message and "big.png" in error.message


async def test_truncated_and_corrupt_messages_are_clear(pool: ImagePool) -> None:
    truncated = encode("png", 64, 64, noisy=True)[:-200]
    error = await edit_error(pool, multipart({"prompt": "p"}, [("image", ("t.png", truncated))]))
    assert "t.png" in error.message and "0x" not in error.message
    empty = await edit_error(pool, multipart({"prompt": "p"}, [("image", ("e.png", b""))]))
    assert "empty" in empty.message


@pytest.mark.parametrize("count", [17, 40])
async def test_too_many_images(pool: ImagePool, count: int) -> None:
    files = [("image[]", (f"{i}.png", PNG)) for i in range(count)]
    error = await edit_error(pool, multipart({"prompt": "p"}, files))
    assert error.param == "image" and error.code == "too_many_images"
    assert "16" in error.message


async def test_sixteen_images_are_fine(pool: ImagePool) -> None:
    req = await edit(pool, multipart({"prompt": "p"}, [("image[]", (f"{i}.png", PNG)) for i in range(16)]))
    assert len(req.images) == 16


async def test_per_file_size_limits_are_413(pool: ImagePool) -> None:
    big = PNG + b"\0" * LIMITS.max_image_bytes
    error = await edit_error(pool, multipart({"prompt": "p"}, [("image", ("a.png", big))]))
    assert isinstance(error, PayloadTooLarge) and error.status == 413 and error.param == "image"
    big_mask = PNG + b"\0" * LIMITS.max_mask_bytes
    error = await edit_error(pool, multipart({"prompt": "p"}, [("image", ("a.png", PNG)), ("mask", ("m", big_mask))]))
    assert error.status == 413 and error.param == "mask"


async def test_parser_errors_outside_an_app_are_400_too(pool: ImagePool) -> None:
    request = as_starlette(
        httpx.Request(
            "POST",
            "http://test/v1/images/edits",
            content=b"--xyz\r\nbroken",
            headers={"content-type": "multipart/form-data"},  # no boundary
        ),
        in_app=False,
    )
    error = await edit_error(pool, request)
    assert error.status == 400 and error.code == "invalid_multipart"


async def test_urlencoded_edit_without_files_is_missing_image(pool: ImagePool) -> None:
    request = as_starlette(httpx.Request("POST", "http://test/v1/images/edits", data={"prompt": "p"}))
    error = await edit_error(pool, request)
    assert error.param == "image" and error.code == "missing_required_parameter"


# -- JSON edits ------------------------------------------------------------------------------------


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


async def test_json_edit_data_uri_and_url(pool: ImagePool) -> None:
    body = {
        "prompt": "p",
        "model": "m",
        "images": [{"image_url": data_uri(JPEG, "image/png")}, {"image_url": "https://cdn.example.com/x/cat.png"}],
        "mask": {"image_url": data_uri(PNG)},
        "size": None,
    }
    req = await edit(pool, json_request(body))
    first, second = req.images
    assert first.data == JPEG and first.format == "jpeg" and first.url is None
    assert second == InputImage(url="https://cdn.example.com/x/cat.png")  # not fetched
    assert req.mask is not None and req.mask.format == "png"
    assert req.size is None and req.model == "m"


async def test_json_edit_urlsafe_unpadded_base64_is_accepted(pool: ImagePool) -> None:
    raw = base64.urlsafe_b64encode(PNG).decode().rstrip("=")
    req = await edit(pool, json_request({"prompt": "p", "images": [{"image_url": f"data:image/png;base64,{raw}"}]}))
    assert req.images[0].data == PNG


@pytest.mark.parametrize(
    ("body", "param", "error_type"),
    [
        ({"prompt": "p"}, "images", InvalidRequest),
        ({"prompt": "p", "images": []}, "images", InvalidRequest),
        ({"prompt": "p", "images": {"image_url": "https://x.example/a.png"}}, "images", InvalidRequest),
        ({"prompt": "p", "images": [{"file_id": "file-abc"}]}, "images", UnsupportedParameter),
        ({"prompt": "p", "images": [{"image_url": "https://x.example/a", "file_id": "f"}]}, "images", InvalidRequest),
        ({"prompt": "p", "images": [{"image_url": "https://x.example/a", "detail": "high"}]}, "images", InvalidRequest),
        ({"prompt": "p", "images": [{}]}, "images", InvalidRequest),
        ({"prompt": "p", "images": ["https://x.example/a.png"]}, "images", InvalidRequest),
        ({"prompt": "p", "images": [{"image_url": "ftp://x.example/a.png"}]}, "images", InvalidRequest),
        ({"prompt": "p", "images": [{"image_url": "file:///etc/passwd"}]}, "images", InvalidRequest),
        ({"prompt": "p", "images": [{"image_url": "data:image/png;base64,!!!"}]}, "images", InvalidRequest),
        ({"prompt": "p", "images": [{"image_url": data_uri(b"text")}]}, "images", InvalidRequest),
        ({"prompt": "p", "images": [{"image_url": data_uri(PNG)}] * 17}, "images", InvalidRequest),
        ({"prompt": "p", "images": [{"image_url": data_uri(PNG)}], "mask": {"file_id": "f"}}, "mask",
         UnsupportedParameter),
        ({"prompt": "p", "image": data_uri(PNG)}, "image", InvalidRequest),
        ({"images": [{"image_url": data_uri(PNG)}]}, "prompt", InvalidRequest),
    ],
)  # fmt: skip
async def test_json_edit_bad_inputs(pool: ImagePool, body: dict[str, Any], param: str, error_type: type) -> None:
    error = await edit_error(pool, json_request(body))
    assert isinstance(error, error_type) and error.status == 400 and error.param == param, error.message


async def test_json_edit_data_uri_over_the_cap_is_413(pool: ImagePool) -> None:
    uri = data_uri(PNG + b"\0" * LIMITS.max_image_bytes)
    error = await edit_error(pool, json_request({"prompt": "p", "images": [{"image_url": uri}]}))
    assert error.status == 413 and error.param == "images"


@pytest.mark.parametrize("body", [b"", b"not json", b"[1]", b'"s"', b"NaN", b"[" * 100_000])
async def test_json_bodies_that_are_not_objects(pool: ImagePool, body: bytes) -> None:
    error = await edit_error(pool, json_request(body))
    assert error.status == 400 and error.code == "invalid_json"
    with pytest.raises(InvalidRequest):
        await parse_generation_request(json_request(body, "/v1/images/generations"), limits=LIMITS)


# -- generations -----------------------------------------------------------------------------------


async def test_generation_nulls_mean_defaults() -> None:
    body = {"prompt": "otter", "model": None, "n": None, "size": None, "moderation": "low", "partial_images": 2}
    req = await parse_generation_request(json_request(body, "/v1/images/generations"), limits=LIMITS)
    assert req.operation == "generate" and req.model == DEFAULT_GENERATION_MODEL
    assert req.n == 1 and req.size is None and req.moderation == "low" and req.partial_images == 2
    assert req.images == [] and req.extra == {}


# -- materialize -----------------------------------------------------------------------------------


def mock_fetcher(handler: Any) -> GuardedFetcher:
    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34"]

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return GuardedFetcher(http, FetchSettings(), resolver=resolver)


async def test_materialize_fetches_and_probes(pool: ImagePool) -> None:
    fetcher = mock_fetcher(lambda request: httpx.Response(200, content=WEBP))
    image = await materialize(
        InputImage(url="https://cdn.example.com/p/cat.webp"), fetcher, pool=pool, max_pixels=MAX_PIXELS
    )
    assert image.data == WEBP and image.format == "webp" and image.url is None
    assert (image.width, image.height, image.filename) == (32, 24, "cat.webp")


async def test_materialize_keeps_held_bytes_and_rejects_non_images(pool: ImagePool) -> None:
    held = InputImage(data=PNG, format="png")
    fetcher = mock_fetcher(lambda request: httpx.Response(200, content=b"<html>"))
    assert await materialize(held, fetcher, pool=pool, max_pixels=MAX_PIXELS) is held
    with pytest.raises(InvalidRequest) as info:
        await materialize(InputImage(url="https://cdn.example.com/a.png"), fetcher, pool=pool, max_pixels=MAX_PIXELS,
                          param="mask")  # fmt: skip
    assert info.value.param == "mask" and info.value.code == "invalid_image"


@pytest.mark.parametrize("value", ["9" * 5000, "٣", "1_0", "0x10", "+-1"])
def test_odd_integers_are_400_not_500(value: str) -> None:
    assert build_error({"prompt": "p", "seed": value}, form=True).param == "seed"


def test_odd_extras_stay_strings() -> None:
    extra = build({"prompt": "p", "big": "9" * 5000, "uni": "٣", "l[²]": "a", "l[0]": "b"}, form=True).extra
    assert extra == {"big": "9" * 5000, "uni": "٣", "l": {"²": "a", "0": "b"}}


async def test_huge_image_index_is_400(pool: ImagePool) -> None:
    error = await edit_error(pool, multipart({"prompt": "p"}, [("image[" + "9" * 50 + "]", ("a.png", PNG))]))
    assert error.param == "image"


# -- off the event loop ----------------------------------------------------------------------------


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The threads JSON bodies were parsed and data URIs decoded in."""
    seen: dict[str, list[int]] = {"loads": [], "decode": []}
    loads, decode = parsing._loads, parsing._decode_data_uri

    def recording_loads(body: bytes, *decoder: Any) -> Any:
        seen["loads"].append(threading.get_ident())
        return loads(body, *decoder)

    def recording_decode(uri: str, **kwargs: Any) -> bytes:
        seen["decode"].append(threading.get_ident())
        return decode(uri, **kwargs)

    monkeypatch.setattr(parsing, "_loads", recording_loads)
    monkeypatch.setattr(parsing, "_decode_data_uri", recording_decode)
    return seen


async def test_small_json_inline_big_json_and_data_uris_in_the_pool(
    pool: ImagePool, threads: dict[str, list[int]]
) -> None:
    loop_thread = threading.get_ident()
    body = {"prompt": "p", "images": [{"image_url": data_uri(PNG)}], "mask": {"image_url": data_uri(PNG)}}
    small = json.dumps(body).encode()
    req = await edit(pool, json_request(small))
    assert threads["loads"] == [loop_thread]  # a small body: not worth a thread hop
    assert len(threads["decode"]) == 2 and loop_thread not in threads["decode"]
    big = small + b" " * parsing.INLINE_JSON_BYTES
    assert await edit(pool, json_request(big)) == req
    assert len(threads["loads"]) == 2 and threads["loads"][1] != loop_thread


async def test_big_json_generation_is_parsed_in_the_pool_when_given_one(
    pool: ImagePool, threads: dict[str, list[int]]
) -> None:
    body = json.dumps({"prompt": "otter"}).encode() + b"\n" * (parsing.INLINE_JSON_BYTES + 1)
    req = await parse_generation_request(json_request(body, "/v1/images/generations"), limits=LIMITS, pool=pool)
    assert req.prompt == "otter" and threads["loads"][0] != threading.get_ident()


@pytest.mark.parametrize(
    "body",
    [b"[" * 300_000, b'{"prompt": "p"' + b" " * 300_000, b" " * 300_000, b"[1]" + b" " * 300_000, b"\xff" * 300_000],
)
async def test_big_json_bodies_in_the_pool_give_the_same_errors(pool: ImagePool, body: bytes) -> None:
    error = await edit_error(pool, json_request(body))
    assert error.status == 400 and error.code == "invalid_json"


async def test_big_urlsafe_wrapped_data_uri_decodes_in_steps(pool: ImagePool) -> None:
    raw = bytes(range(256)) * 12_000  # ~3 MB: several decoding steps
    text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    wrapped = "\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    cap = 2 * len(raw)  # the size estimate counts the line breaks too
    limits = LimitsSettings(max_pixels=MAX_PIXELS, max_image_bytes=cap, max_prompt_chars=100)
    assert parsing._decode_data_uri(f"data:image/png;base64,{wrapped}", param="images", label="x", cap=cap) == raw
    error = await edit_error(pool, json_request({"prompt": "p", "images": [{"image_url": f"data:;base64,{wrapped}"}]}),
                             limits)  # fmt: skip
    assert error.code == "invalid_image"  # decoded fine, then probed: not an image


def _reference_decode(payload: str) -> bytes:
    """The one-call decoding `_b64decode_lenient` must match."""
    compact = "".join(payload.split()).translate(str.maketrans("-_", "+/"))
    return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)


def test_stepwise_base64_matches_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parsing, "_B64_CHUNK", 8)
    rng = random.Random(7)
    samples = ["", "=", "AAAA====", "AAAAAAAA====", "AAAAAAA=AAAA", "AAAAAA==", "AAAAAAAAAA==", "AAAAAAAAA", "é" * 12]
    samples += [base64.b64encode(rng.randbytes(n)).decode() for n in range(40)]
    samples += ["".join(rng.choice("AB+/-_= \n\x1cé") for _ in range(rng.randrange(30))) for _ in range(3000)]
    for sample in samples:
        try:
            expected: bytes | type[Exception] = _reference_decode(sample)
        except ValueError:
            expected = ValueError
        try:
            got: bytes | type[Exception] = parsing._b64decode_lenient("," + sample, 1)
        except ValueError:
            got = ValueError
        assert got == expected, repr(sample)


async def test_first_error_in_input_order_wins(pool: ImagePool) -> None:
    bad_b64 = {"image_url": "data:image/png;base64,!!!"}
    error = await edit_error(pool, json_request({"prompt": "p", "images": [bad_b64, {"image_url": "ftp://x"}]}))
    assert "'images[0]'" in error.message and "base64" in error.message
    error = await edit_error(pool, json_request({"prompt": "p", "images": [{"image_url": data_uri(PNG)}, "x"]}))
    assert error.code == "invalid_type" and error.param == "images"
    error = await edit_error(pool, json_request({"prompt": "p", "images": [{"image_url": data_uri(PNG)}, bad_b64],
                                                 "mask": {"file_id": "f"}}))  # fmt: skip
    assert "'images[1]'" in error.message
    error = await edit_error(pool, json_request({"prompt": "p", "images": [{"image_url": data_uri(PNG)}],
                                                 "mask": bad_b64}))  # fmt: skip
    assert error.param == "mask" and "'mask'" in error.message


@pytest.mark.parametrize(
    "body",
    [b'\xef\xbb\xbf{"prompt": "p"}', '{"prompt": "é ☃", "n": 2}'.encode("utf-16"), b'{"a": [1.5, {"b": null}]}'],
)
def test_the_shared_decoder_reads_what_json_loads_reads(body: bytes) -> None:
    """The decoder built once reads encodings and values as `json.loads` does (a BOM, UTF-16)."""
    assert parsing._loads(body) == json.loads(body)


@pytest.mark.parametrize(
    "messages",
    [
        [{"type": "http.request", "body": b'{"a": 1}'}],
        [{"type": "http.request", "body": b'{"a"', "more_body": True}, {"type": "http.request", "body": b""},
         {"type": "http.request", "body": b": 1}", "more_body": True}, {"type": "http.request"}],
        [{"type": "http.request", "body": b""}],
        [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}],
    ],
)
async def test_the_body_is_read_as_starlette_reads_it(messages: list[dict[str, Any]]) -> None:
    """`parsing._body` returns what `request.body()` returns, raises what it raises, and leaves the
    request as it does (a later `body()` or `stream()` sees the cached body)."""

    def request_for() -> Request:
        pending = list(messages)

        async def receive() -> dict[str, Any]:
            return pending.pop(0)

        return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)

    outcomes = []
    for read in (parsing._body, lambda r: r.body()):
        request = request_for()
        try:
            outcome: Any = await read(request)
        except ClientDisconnect:
            outcome = "disconnect"
        state = {k: v for k, v in vars(request).items() if k not in ("_receive", "_send")}
        again = [chunk async for chunk in request.stream()] if outcome != "disconnect" else None
        outcomes.append((outcome, state, again))
    assert outcomes[0] == outcomes[1]
