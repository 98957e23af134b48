"""Input edge cases answered 400 naming the parameter, never a 500: text that is not Unicode, URLs
no parser can read, a mask that is not the image's size, enum values OpenAI does not define; and a
response that reports what was really produced.

The gateway runs under uvicorn on 127.0.0.1 with the fake fal server behind it (its fal routes are
where a surrogate used to reach httpx's JSON encoder), plus a small image server for URL inputs.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from tests.conftest import gateway_settings
from tests.fakes.fal import FakeFal
from tests.fakes.images import png_bytes
from tests.fakes.server import LocalServer

from imagegate.app import create_app
from imagegate.core.results import resolved_quality


def _image_server_app() -> Starlette:
    """`GET /<w>x<h>.png` -> a PNG of that size; `GET /bad-redirect` -> a Location no parser reads."""

    async def image(request: Request) -> Response:
        width, height = (int(v) for v in request.path_params["size"].split("x"))
        return Response(png_bytes(width, height, mode="RGBA"), media_type="image/png")

    async def bad_redirect(request: Request) -> Response:
        return Response(status_code=302, headers={"location": "http://[::1/x.png"})

    return Starlette(routes=[Route("/{size}.png", image), Route("/bad-redirect", bad_redirect)])


@pytest.fixture(scope="module")
def fal_server() -> Iterator[tuple[FakeFal, str]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv.url


@pytest.fixture(scope="module")
def upstreams(fal_server: tuple[FakeFal, str]) -> Iterator[tuple[FakeFal, str]]:
    """The fake fal, and the base URL of the image server."""
    with LocalServer(_image_server_app()) as images:
        yield fal_server[0], images.url


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fal_server: tuple[FakeFal, str]) -> Iterator[str]:
    fal_url = fal_server[1]
    settings = gateway_settings(
        tmp_path_factory.mktemp("edges"),
        routing={"deadline_seconds": 20, "backoff_base": 0.01, "backoff_max": 0.05},
        fetch={"allow_hosts": ["127.0.0.1"]},
        models={"fal-edit": {"routes": [{"provider": "fal", "model": "fal-ai/qwen-image-edit-2511"}]}},
        providers={
            "fal": {"key": "test-fal-key", "queue_url": fal_url, "run_url": fal_url + "/sync", "rest_url": fal_url,
                    "poll_interval": 0.01, "poll_max_interval": 0.05},
        },
    )  # fmt: skip
    with LocalServer(create_app(settings)) as srv:
        yield srv.url


@pytest.fixture(autouse=True)
def _fresh_fake(upstreams: tuple[FakeFal, str]) -> None:
    upstreams[0].reset()


def _post_json(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    # ensure_ascii (the default) writes a lone surrogate as the escape "\ud800", exactly as a client would.
    content = json.dumps(body)
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=30)


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body: dict[str, Any] = response.json()["error"]
    return body


def _assert_400(response: httpx.Response, param: str, code: str = "invalid_value") -> None:
    assert response.status_code == 400, response.text
    error = _error(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# -- text that is not Unicode ----------------------------------------------------------------------

SURROGATE = "\ud800"
SURROGATE_BODIES = [
    ("prompt", {"prompt": SURROGATE + " cat"}),
    ("negative_prompt", {"negative_prompt": "dog " + SURROGATE}),
    ("user", {"user": SURROGATE}),
    ("model", {"model": SURROGATE}),
    ("size", {"size": SURROGATE}),
    ("quality", {"quality": "high" + SURROGATE}),
    ("loras", {"loras": [{"path": "https://x.test/a.safetensors", "scale": SURROGATE}]}),  # an extra, nested
    ("acceleration", {"acceleration": "\udfff"}),  # an extra passed to fal as is
]


@pytest.mark.parametrize(("param", "fields"), SURROGATE_BODIES, ids=[p for p, _ in SURROGATE_BODIES])
@pytest.mark.parametrize("model", ["sandbox-edit", "fal-edit"])
def test_lone_surrogates_in_json_edits_are_400s(
    gateway: str, upstreams: tuple[FakeFal, str], model: str, param: str, fields: dict[str, Any]
) -> None:
    body = {"model": model, "prompt": "cat", "images": [{"image_url": _data_uri(png_bytes(16, 16))}], **fields}
    _assert_400(_post_json(gateway, "/v1/images/edits", body), param)
    assert upstreams[0].submits == [] and upstreams[0].runs == []


def test_lone_surrogates_in_generations_keys_and_image_urls_are_400s(gateway: str) -> None:
    _assert_400(_post_json(gateway, "/v1/images/generations", {"prompt": "a " + SURROGATE}), "prompt")
    response = _post_json(gateway, "/v1/images/generations", {"prompt": "cat", "x" + SURROGATE: 1})
    _assert_400(response, "x\\ud800")  # the offending name, escaped
    body = {"model": "sandbox-edit", "prompt": "cat", "images": [{"image_url": "https://x.test/" + SURROGATE}]}
    _assert_400(_post_json(gateway, "/v1/images/edits", body), "images")
    # A valid surrogate pair is ordinary text.
    fine = _post_json(gateway, "/v1/images/generations", {"prompt": "a \ud83d\ude00 cat", "size": "64x64"})
    assert fine.status_code == 200, fine.text


def test_a_surrogate_in_a_big_json_body_checked_in_the_pool_is_a_400(gateway: str) -> None:
    body = {"prompt": "cat", "padding": "a" * 400_000, "user": "u" + SURROGATE}  # > 256 kB: parsed in the pool
    _assert_400(_post_json(gateway, "/v1/images/generations", body), "user")


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "user", "style", "custom_option"])
def test_invalid_utf8_in_multipart_text_is_a_400(gateway: str, upstreams: tuple[FakeFal, str], field: str) -> None:
    data: dict[str, Any] = {"model": "fal-edit", "prompt": "cat", field: b"caf\xe9 \xff"}
    response = httpx.post(gateway + "/v1/images/edits", data=data,
                          files={"image": ("a.png", png_bytes(16, 16), "image/png")}, timeout=30)  # fmt: skip
    _assert_400(response, field)
    assert upstreams[0].submits == []


def test_valid_utf8_in_multipart_text_is_kept(gateway: str, upstreams: tuple[FakeFal, str]) -> None:
    response = httpx.post(gateway + "/v1/images/edits", data={"model": "fal-edit", "prompt": "café ☕"},
                          files={"image": ("a.png", png_bytes(16, 16), "image/png")}, timeout=30)  # fmt: skip
    assert response.status_code == 200, response.text
    assert upstreams[0].last_submit.input["prompt"] == "café ☕"


# -- URLs that no parser can read --------------------------------------------------------------

BAD_URLS = ["http://[::1/", "http://[::1", "http://example.com:99999/a.png", "http://example.com:-1/a.png",
            "http://[v1.x]/a.png", "http://\u2100.com/a.png"]  # fmt: skip


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize("model", ["sandbox-edit", "fal-edit"])
def test_unparseable_image_urls_are_400s(gateway: str, upstreams: tuple[FakeFal, str], model: str, url: str) -> None:
    body = {"model": model, "prompt": "cat", "images": [{"image_url": url}]}
    _assert_400(_post_json(gateway, "/v1/images/edits", body), "images", "invalid_url")
    mask = {"model": model, "prompt": "cat", "images": [{"image_url": _data_uri(png_bytes(8, 8))}],
            "mask": {"image_url": url}}  # fmt: skip
    _assert_400(_post_json(gateway, "/v1/images/edits", mask), "mask", "invalid_url")
    assert upstreams[0].submits == []


def test_a_redirect_to_an_unparseable_url_is_a_400(gateway: str, upstreams: tuple[FakeFal, str]) -> None:
    body = {"model": "sandbox-edit", "prompt": "cat", "images": [{"image_url": upstreams[1] + "/bad-redirect"}]}
    response = _post_json(gateway, "/v1/images/edits", body)
    assert response.status_code == 400 and _error(response)["param"] == "images"


# -- the mask has the image's dimensions, always -------------------------------------------------


def _multipart_edit(url: str, images: list[bytes], mask: bytes, **fields: str) -> httpx.Response:
    files = [("image[]", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
    files.append(("mask", ("m.png", mask, "image/png")))
    data = {"model": "sandbox-edit", "prompt": "invert", "response_format": "b64_json", **fields}
    return httpx.post(url + "/v1/images/edits", data=data, files=files, timeout=30)


def test_a_mask_of_another_size_is_refused_for_one_image(gateway: str) -> None:
    response = _multipart_edit(gateway, [png_bytes(40, 30)], png_bytes(20, 15, mode="RGBA"))
    _assert_400(response, "mask")
    assert "20x15" in _error(response)["message"] and "40x30" in _error(response)["message"]


def test_a_mask_of_another_size_is_refused_for_several_images(gateway: str) -> None:
    # The mask matches the second image and the composite's height: it still is not the first image's size.
    response = _multipart_edit(gateway, [png_bytes(40, 30), png_bytes(20, 30)], png_bytes(20, 30, mode="RGBA"))
    _assert_400(response, "mask")


def test_a_mask_of_the_first_images_size_works_with_several_images(gateway: str) -> None:
    response = _multipart_edit(gateway, [png_bytes(40, 30), png_bytes(20, 30)], png_bytes(40, 30, mode="RGBA"))
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "60x30"


def test_a_json_mask_of_another_size_is_refused(gateway: str, upstreams: tuple[FakeFal, str]) -> None:
    for model in ("sandbox-edit", "fal-edit"):
        body = {"model": model, "prompt": "x", "images": [{"image_url": _data_uri(png_bytes(40, 30))}],
                "mask": {"image_url": _data_uri(png_bytes(30, 40, mode="RGBA"))}}  # fmt: skip
        _assert_400(_post_json(gateway, "/v1/images/edits", body), "mask")
    assert upstreams[0].submits == []


def test_a_fetched_mask_of_another_size_is_refused(gateway: str, upstreams: tuple[FakeFal, str]) -> None:
    images_url = upstreams[1]
    body = {"model": "sandbox-edit", "prompt": "invert", "images": [{"image_url": images_url + "/40x30.png"}],
            "mask": {"image_url": images_url + "/41x30.png"}}  # fmt: skip
    _assert_400(_post_json(gateway, "/v1/images/edits", body), "mask")
    body["mask"] = {"image_url": images_url + "/40x30.png"}
    ok = _post_json(gateway, "/v1/images/edits", body)
    assert ok.status_code == 200, ok.text


# -- an output format that cannot hold the image --------------------------------------------------


@pytest.mark.parametrize(("fmt", "width"), [("webp", 16_384), ("gif", 65_536), ("jpeg", 65_501)])
def test_an_image_too_wide_for_its_output_format_is_a_400(gateway: str, fmt: str, width: int) -> None:
    # webp is written by the sandbox itself; gif and jpeg conversions by the gateway (emulated or not)
    files = {"image": ("wide.png", png_bytes(width, 2), "image/png")}
    data = {"model": "sandbox-edit", "prompt": "invert", "output_format": fmt, "response_format": "b64_json"}
    response = httpx.post(gateway + "/v1/images/edits", data=data, files=files, timeout=30)
    _assert_400(response, "output_format")
    assert str(width) in _error(response)["message"]


# -- enum parameters and what the response reports ----------------------------------------------

BAD_ENUMS = [("quality", "ultra"), ("style", "bold"), ("moderation", "none"), ("input_fidelity", "medium"),
             ("background", "clear"), ("output_format", "tiff"), ("response_format", "file")]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), BAD_ENUMS)
def test_enum_values_openai_does_not_define_are_400s(gateway: str, field: str, value: str) -> None:
    response = _post_json(gateway, "/v1/images/generations", {"prompt": "cat", field: value})
    _assert_400(response, field)
    assert f"'{value}'" in _error(response)["message"]


def test_the_sdk_sees_a_bad_enum_as_bad_request(gateway: str) -> None:
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="sandbox-image", prompt="cat", extra_body={"quality": "ultra"})
    assert info.value.param == "quality"
    client.close()


def test_the_response_reports_the_quality_produced_not_an_ignored_one(gateway: str) -> None:
    for asked in ("low", "hd", "auto"):
        response = _post_json(gateway, "/v1/images/generations",
                              {"prompt": "cat", "size": "64x64", "quality": asked, "background": "opaque"})  # fmt: skip
        assert response.status_code == 200, response.text
        assert "quality=ignored" in response.headers["x-imagegate-params"]
        body = response.json()
        assert (body["quality"], body["background"]) == ("high", "opaque")  # the sandbox's one quality


def test_resolved_quality() -> None:
    assert resolved_quality("low", honoured=True) == "low"
    assert resolved_quality("hd", honoured=True) == "high"
    assert resolved_quality("standard", honoured=True) == "medium"
    assert resolved_quality("auto", honoured=True) == "high"
    assert resolved_quality("low", honoured=False) == "high"
    assert resolved_quality(None, honoured=False) == "high"
