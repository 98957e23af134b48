"""Bad input gets OpenAI's envelope with the right `param`, the SDK raises the right class,
and the server keeps serving."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import openai
import pytest
from tests.fakes.images import png_bytes


def huge_png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + b"\0" * 64


GOOD = ("a.png", png_bytes(16, 16))

EDIT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("missing prompt", {"image": GOOD, "prompt": ""}, "prompt"),
    ("corrupt image", {"image": ("a.png", png_bytes(16, 16)[:60]), "prompt": "x"}, "image"),
    ("text named png", {"image": ("a.png", b"hello, I am text"), "prompt": "x"}, "image"),
    ("empty file", {"image": ("a.png", b""), "prompt": "x"}, "image"),
    ("over max pixels", {"image": ("a.png", huge_png_header(100_000, 100_000)), "prompt": "x"}, "image"),
    ("17 images", {"image": [GOOD] * 17, "prompt": "x"}, "image"),
    ("size 0x5", {"image": GOOD, "prompt": "x", "size": "0x5"}, "size"),
    ("size abc", {"image": GOOD, "prompt": "x", "size": "abc"}, "size"),
    ("size 20000x10", {"image": GOOD, "prompt": "x", "size": "20000x10"}, "size"),
    ("n 0", {"image": GOOD, "prompt": "x", "n": 0}, "n"),
    ("n 11", {"image": GOOD, "prompt": "x", "n": 11}, "n"),
    ("n x", {"image": GOOD, "prompt": "x", "extra_body": {"n": "x"}}, "n"),
    ("compression 101", {"image": GOOD, "prompt": "x", "output_compression": 101}, "output_compression"),
    ("unknown output_format", {"image": GOOD, "prompt": "x", "output_format": "bmp"}, "output_format"),
    ("negative seed", {"image": GOOD, "prompt": "x", "extra_body": {"seed": -1}}, "seed"),
    ("resolution overflow", {"image": GOOD, "prompt": "x", "extra_body": {"resolution": "9" * 400}}, "resolution"),
    ("tiff input", {"image": ("a.tif", b"II*\x00" + b"\x00" * 64), "prompt": "x"}, "image"),
]


@pytest.mark.parametrize(("case", "kwargs", "param"), EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
async def test_bad_edit_is_a_400_naming_the_param(sdk: openai.AsyncOpenAI, case: str, kwargs: dict[str, Any],
                                                 param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.images.edit(model="sandbox-edit", **kwargs)
    assert info.value.status_code == 400
    assert info.value.param == param, info.value.body
    assert info.value.type == "invalid_request_error"
    assert info.value.request_id
    # and the server keeps serving
    ok = await sdk.images.edit(model="sandbox-edit", image=GOOD, prompt="invert", response_format="b64_json")
    assert ok.data and ok.data[0].b64_json


async def test_missing_image(client: Any) -> None:
    response = await client.post("/v1/images/edits", data={"prompt": "x", "model": "sandbox-edit"},
                                 files={"mask": ("m.png", png_bytes(8, 8, mode="RGBA"))})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "image"


async def test_unknown_model_is_404(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.images.generate(model="no-such-model", prompt="x")
    assert info.value.code == "model_not_found"


async def test_no_fastapi_422_ever(client: Any) -> None:
    for body in (b"not json", b"[1, 2]", b'{"prompt": 5}', b'{"prompt": "x", "n": "many"}'):
        response = await client.post("/v1/images/generations", content=body,
                                     headers={"content-type": "application/json"})
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "detail" not in response.json()


async def test_explicit_null_means_default(client: Any) -> None:
    response = await client.post(
        "/v1/images/generations",
        json={"model": "sandbox-image", "prompt": "x", "size": None, "n": None, "response_format": "b64_json",
              "quality": None, "background": None, "output_format": None},
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1


async def test_oversized_body_is_413(client: Any) -> None:
    app = client._transport.app
    limit = app.state.settings.limits.max_image_bytes
    too_big = png_bytes(16, 16) + b"\0" * (limit + 1)
    response = await client.post("/v1/images/edits", data={"prompt": "x", "model": "sandbox-edit"},
                                 files={"image": ("a.png", io.BytesIO(too_big))})
    assert response.status_code == 413
    assert response.json()["error"]["param"] == "image"
