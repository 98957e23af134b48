"""Large `b64_json` responses are rendered off the event loop, byte for byte as JSONResponse renders."""

from __future__ import annotations

import asyncio
import threading

import pytest
from starlette.responses import JSONResponse

from imagegate.api import render


def _body(size: int) -> dict[str, object]:
    return {"created": 1, "data": [{"b64_json": "A" * size, "revised_prompt": "é ☃"}], "usage": {"n": 1}}


@pytest.mark.parametrize("size", [10, render.THREAD_BYTES + 1])
async def test_same_bytes_as_jsonresponse(size: int) -> None:
    body = _body(size)
    response = await render.json_response(body, status_code=201, headers={"x-a": "b"})
    expected = JSONResponse(body, status_code=201, headers={"x-a": "b"})
    assert response.body == expected.body
    assert response.status_code == 201
    assert response.headers["content-type"] == expected.headers["content-type"]
    assert response.headers["content-length"] == expected.headers["content-length"]
    assert response.headers["x-a"] == "b"


async def test_large_image_data_renders_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = render._render

    def spy(content: object) -> bytes:
        threads.append(threading.current_thread().name)
        return real(content)

    monkeypatch.setattr(render, "_render", spy)
    loop_thread = threading.current_thread().name
    await render.json_response(_body(render.THREAD_BYTES + 1))
    await render.json_response({"id": "imgjob_1", "result": _body(render.THREAD_BYTES + 1)})
    await render.json_response(_body(100))
    assert len(threads) == 3 and loop_thread not in threads[:2] and threads[2] == loop_thread  # small: inline
    assert asyncio.get_running_loop().is_running()


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (200, None),
        (200, {}),
        (201, {"X-Imagegate-Provider": "fal", "x-request-id": "req_1"}),
        (200, {"content-type": "application/problem+json", "Content-Length": "3"}),
        (204, {"x-a": "b"}),
        (101, None),
    ],
)
@pytest.mark.parametrize("size", [10, render.THREAD_BYTES + 1])
async def test_the_response_is_the_one_jsonresponse_builds(
    status: int, headers: dict[str, str] | None, size: int
) -> None:
    """Every attribute, raw headers in order included, as `JSONResponse(...)` sets them."""
    body = _body(size)
    response = await render.json_response(body, status_code=status, headers=headers)
    expected = JSONResponse(body, status_code=status, headers=headers)
    assert type(response) is JSONResponse
    assert vars(response) == vars(expected)
