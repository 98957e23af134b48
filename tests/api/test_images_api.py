"""The image endpoints through httpx and through the official openai SDK, around a fake service."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from tests.api.conftest import MAX_PIXELS, OUTPUT_PNG, FakeService, encode
from tests.fakes.server import LocalServer

from imagegate.api.images import ClientDisconnected, ImageEventStream, run_until_disconnect, wait_for_disconnect
from imagegate.core.errors import ModelNotFound, RateLimited
from imagegate.core.results import ImageResult, OutputImage

PNG = encode("png")
JPEG = encode("jpeg", 40, 30)
WEBP = encode("webp", 20, 10)
GOOD = ("a.png", PNG)


# -- what reaches the service ----------------------------------------------------------------------


async def test_single_image_via_sdk(sdk: openai.AsyncOpenAI, service: FakeService) -> None:
    result = await sdk.images.edit(image=GOOD, prompt="invert", size="64x48", n=2)
    assert [item.b64_json for item in result.data or []] == [base64.b64encode(OUTPUT_PNG).decode()] * 2
    req = service.last
    assert req.operation == "edit" and req.prompt == "invert" and req.size == "64x48" and req.n == 2
    assert req.model == "sandbox-edit"
    [image] = req.images
    assert (image.format, image.width, image.height, image.filename, image.data) == ("png", 32, 24, "a.png", PNG)
    call = service.calls[-1]
    assert call.base_url == "http://test" and call.request_id.startswith("req_") and call.dry_run is False


async def test_list_of_three_raw_bytes_and_tuples_via_sdk(sdk: openai.AsyncOpenAI, service: FakeService) -> None:
    await sdk.images.edit(image=[PNG, ("b.jpg", JPEG), ("c.webp", WEBP, "image/webp")], prompt="merge")
    assert [(i.filename, i.format, i.width, i.height) for i in service.last.images] == [
        ("upload", "png", 32, 24),
        ("b.jpg", "jpeg", 40, 30),
        ("c.webp", "webp", 20, 10),
    ]


async def test_raw_bytes_arrive_as_octet_stream_and_are_sniffed(sdk: openai.AsyncOpenAI, service: FakeService) -> None:
    await sdk.images.edit(image=JPEG, prompt="mirror", mask=("m.png", encode("png", 40, 30, mode="RGBA")))
    [image] = service.last.images
    assert image.format == "jpeg" and image.data == JPEG
    assert service.last.mask is not None and service.last.mask.format == "png"


async def test_sdk_scalars_and_extra_body_reach_the_service(sdk: openai.AsyncOpenAI, service: FakeService) -> None:
    await sdk.images.edit(
        image=GOOD,
        prompt="p",
        model="qwen-image-edit-2511",
        output_format="jpeg",
        output_compression=70,
        background="opaque",
        quality="high",
        response_format="b64_json",
        extra_body={"seed": 7, "cfg_scale": 2.5, "acceleration": "high", "enable_safety_checker": False},
    )
    req = service.last
    assert (req.model, req.output_format, req.output_compression, req.background, req.quality) == (
        "qwen-image-edit-2511",
        "jpeg",
        70,
        "opaque",
        "high",
    )
    assert (req.seed, req.cfg_scale, req.response_format) == (7, 2.5, "b64_json")
    assert req.extra == {"acceleration": "high", "enable_safety_checker": False}


async def test_generation_via_sdk_with_explicit_nulls(sdk: openai.AsyncOpenAI, service: FakeService) -> None:
    result = await sdk.images.generate(prompt="otter", size=None, n=None, moderation="low", model=None)
    assert result.created == 1_700_000_000 and result.output_format == "png"
    req = service.last
    assert (req.operation, req.model, req.n, req.size, req.moderation) == (
        "generate",
        "sandbox-image",
        1,
        None,
        "low",
    )


async def test_generation_json_nulls_are_defaults(client: httpx.AsyncClient, service: FakeService) -> None:
    body = {"prompt": "x", "size": None, "n": None, "quality": None, "background": None, "output_format": None}
    response = await client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["data"] == [{"b64_json": base64.b64encode(OUTPUT_PNG).decode()}]
    req = service.last
    assert req.size is None and req.n == 1 and req.quality is None and req.output_format is None


async def test_json_edit_passes_urls_unfetched(client: httpx.AsyncClient, service: FakeService) -> None:
    data_uri = "data:image/png;base64," + base64.b64encode(WEBP).decode()
    body = {"prompt": "p", "images": [{"image_url": "https://cdn.example.com/a.png"}, {"image_url": data_uri}]}
    response = await client.post("/v1/images/edits", json=body)
    assert response.status_code == 200, response.text
    url_image, inline = service.last.images
    assert url_image.url == "https://cdn.example.com/a.png" and url_image.data is None
    assert inline.format == "webp" and inline.data == WEBP


async def test_result_headers_and_request_id(client: httpx.AsyncClient, service: FakeService) -> None:
    service.headers = {"x-imagegate-params": "n=emulated", "x-imagegate-provider": "fake"}
    response = await client.post("/v1/images/edits", data={"prompt": "p"}, files={"image": GOOD})
    assert response.status_code == 200
    assert response.headers["x-imagegate-params"] == "n=emulated"
    assert response.headers["x-imagegate-provider"] == "fake"
    assert response.headers["x-request-id"] == service.calls[-1].request_id


@pytest.mark.parametrize(
    ("headers", "query"),
    [({"x-imagegate-dry-run": "1"}, ""), ({}, "?dry_run=1"), ({"x-imagegate-dry-run": "true"}, "")],
)
async def test_dry_run_flag_reaches_the_service(
    client: httpx.AsyncClient, service: FakeService, headers: dict[str, str], query: str
) -> None:
    response = await client.post(f"/v1/images/generations{query}", json={"prompt": "p"}, headers=headers)
    assert response.status_code == 200
    assert service.calls[-1].dry_run is True
    assert response.json()["object"] == "imagegate.dry_run"
    assert response.headers["x-imagegate-provider"] == "fake"


async def test_no_dry_run_without_the_flag(client: httpx.AsyncClient, service: FakeService) -> None:
    await client.post("/v1/images/generations?dry_run=0", json={"prompt": "p"}, headers={"x-imagegate-dry-run": "no"})
    assert service.calls[-1].dry_run is False


# -- bad inputs ------------------------------------------------------------------------------------

BAD_EDITS: list[tuple[str, dict[str, Any], str]] = [
    ("missing prompt", {"image": GOOD, "prompt": ""}, "prompt"),
    ("missing image", {"image": [], "prompt": "x"}, "image"),
    ("truncated image", {"image": ("a.png", encode("png", 64, 64, noisy=True)[:-300]), "prompt": "x"}, "image"),
    ("corrupt image", {"image": ("a.png", PNG[:33] + b"\xff" * 200), "prompt": "x"}, "image"),
    ("text named png", {"image": ("a.png", b"hello, I am text"), "prompt": "x"}, "image"),
    ("empty file", {"image": ("a.png", b""), "prompt": "x"}, "image"),
    ("over max pixels", {"image": ("a.png", encode("png", 1001, 1000)), "prompt": "x"}, "image"),
    ("17 images", {"image": [GOOD] * 17, "prompt": "x"}, "image"),
    ("size 0x5", {"image": GOOD, "prompt": "x", "size": "0x5"}, "size"),
    ("size abc", {"image": GOOD, "prompt": "x", "size": "abc"}, "size"),
    ("size 20000x10", {"image": GOOD, "prompt": "x", "size": "20000x10"}, "size"),
    ("n 0", {"image": GOOD, "prompt": "x", "n": 0}, "n"),
    ("n 11", {"image": GOOD, "prompt": "x", "n": 11}, "n"),
    ("n x", {"image": GOOD, "prompt": "x", "extra_body": {"n": "x"}}, "n"),
    ("compression 101", {"image": GOOD, "prompt": "x", "output_compression": 101}, "output_compression"),
    ("unknown output_format", {"image": GOOD, "prompt": "x", "output_format": "bmp"}, "output_format"),
]


@pytest.mark.parametrize(("case", "kwargs", "param"), BAD_EDITS, ids=[c[0] for c in BAD_EDITS])
async def test_bad_edit_inputs_are_400_and_the_app_keeps_serving(
    sdk: openai.AsyncOpenAI, service: FakeService, case: str, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.images.edit(**kwargs)
    error = info.value
    assert (error.status_code, error.param, error.type) == (400, param, "invalid_request_error"), error.body
    assert isinstance(error.body, dict) and set(error.body) == {"message", "type", "param", "code"}
    assert error.request_id and error.request_id.startswith("req_")
    assert service.calls == []  # rejected before the service
    ok = await sdk.images.edit(image=GOOD, prompt="fine")
    assert ok.data and len(service.calls) == 1


async def test_over_max_pixels_names_the_limit(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.images.edit(image=("big.png", encode("png", 1001, 1000)), prompt="x")
    assert str(MAX_PIXELS) in info.value.message


BAD_GENERATIONS: list[tuple[dict[str, Any], str]] = [
    ({"prompt": "x", "size": "0x5"}, "size"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "output_compression": 101}, "output_compression"),
    ({"prompt": "x", "output_format": "bmp"}, "output_format"),
    ({"prompt": "x", "response_format": "binary"}, "response_format"),
    ({"prompt": ""}, "prompt"),
]


@pytest.mark.parametrize(("kwargs", "param"), BAD_GENERATIONS)
async def test_bad_generation_inputs(sdk: openai.AsyncOpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.images.generate(**kwargs)
    assert info.value.param == param


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"prompt": 5}', b'{"prompt": "x", "n": "many"}', b"null"])
async def test_no_fastapi_422_for_bad_json(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"].startswith("req_")


async def test_unknown_model_reaches_the_service(sdk: openai.AsyncOpenAI, service: FakeService) -> None:
    await sdk.images.generate(prompt="x", model="not-in-catalog")
    assert service.last.model == "not-in-catalog"


async def test_service_errors_map_to_sdk_exceptions(sdk: openai.AsyncOpenAI, service: FakeService) -> None:
    service.error = RateLimited("slow down", retry_after=1.5)
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.images.edit(image=GOOD, prompt="x")
    assert info.value.response.headers["retry-after"] == "2"
    assert info.value.response.headers["retry-after-ms"] == "1500"


# -- streaming -------------------------------------------------------------------------------------


async def test_sdk_stream_yields_completed_events(sdk: openai.AsyncOpenAI, service: FakeService) -> None:
    service.delay = 0.05
    stream = await sdk.images.edit(image=GOOD, prompt="p", stream=True, n=2, response_format="url")
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_edit.completed", "image_edit.completed"]
    first = events[0]
    assert base64.b64decode(first.b64_json) == OUTPUT_PNG
    assert (first.created_at, first.size, first.quality, first.background, first.output_format) == (
        1_700_000_000,
        "32x24",
        "high",
        "opaque",
        "png",
    )
    assert service.last.stream is True and service.last.response_format == "b64_json"  # forced for streams


async def test_sse_framing_keepalive_then_completed(client: httpx.AsyncClient, service: FakeService) -> None:
    service.delay = 0.1  # several keepalive intervals (0.02 s)
    response = await client.post("/v1/images/generations", json={"prompt": "p", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"].startswith("req_")
    assert response.headers["x-imagegate-provider"] == "fake"  # the plan's headers, sent before the result
    text = response.text
    frames = [f for f in text.split("\n\n") if f]
    assert frames[0] == ": keepalive" and frames.count(": keepalive") >= 2
    event_frames = [f for f in frames if not f.startswith(":")]
    assert len(event_frames) == 1
    event_line, data_line = event_frames[0].split("\n")
    assert event_line == "event: image_generation.completed"
    payload = json.loads(data_line.removeprefix("data: "))
    assert set(payload) == {"type", "b64_json", "created_at", "size", "quality", "background", "output_format", "usage"}
    assert payload["type"] == "image_generation.completed"
    assert set(payload["usage"]) >= {"total_tokens", "input_tokens", "output_tokens", "input_tokens_details"}
    assert text.endswith("\n\n")
    for frame in frames:  # never an event without data
        assert not frame.startswith("event:") or "\ndata: " in frame


async def test_stream_error_before_the_first_byte_is_a_plain_error(
    sdk: openai.AsyncOpenAI, service: FakeService
) -> None:
    service.error = ModelNotFound("The model `nope` does not exist or you do not have access to it.")
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.images.edit(image=GOOD, prompt="p", model="nope", stream=True)
    assert info.value.code == "model_not_found"
    service.error = RateLimited("busy", retry_after=1)
    with pytest.raises(openai.RateLimitError):
        await sdk.images.generate(prompt="p", stream=True)


async def test_stream_error_after_keepalives_is_an_error_event(sdk: openai.AsyncOpenAI, service: FakeService) -> None:
    service.delay = 0.1  # > keepalive_seconds (0.02): the stream has started
    service.error = RateLimited("upstream is busy")
    stream = await sdk.images.edit(image=GOOD, prompt="p", stream=True)
    with pytest.raises(openai.APIError) as info:
        async for _ in stream:
            pass
    assert not isinstance(info.value, openai.APIStatusError)
    assert "upstream is busy" in info.value.message and info.value.code == "rate_limit_exceeded"


@pytest.mark.parametrize("delay", [0.0, 0.1])
async def test_stream_unexpected_error_is_generic(
    client: httpx.AsyncClient, service: FakeService, delay: float
) -> None:
    service.delay = delay
    service.error = RuntimeError("secret token sk-123")
    response = await client.post("/v1/images/generations", json={"prompt": "p", "stream": True})
    assert "sk-123" not in response.text
    if delay == 0:
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        return
    assert response.status_code == 200
    frames = [f for f in response.text.split("\n\n") if f and not f.startswith(":")]
    assert len(frames) == 1 and frames[0].startswith("event: error\ndata: ")
    body = json.loads(frames[0].split("data: ", 1)[1])
    assert body["error"]["type"] == "server_error"


async def test_stream_validation_errors_are_plain_4xx(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/images/generations", json={"prompt": "p", "stream": True, "n": 0})
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["param"] == "n"


async def test_stream_dry_run_is_json(client: httpx.AsyncClient, service: FakeService) -> None:
    response = await client.post("/v1/images/generations?dry_run=1", json={"prompt": "p", "stream": True})
    assert response.json()["object"] == "imagegate.dry_run" and service.calls[-1].dry_run is True


# -- client disconnects ----------------------------------------------------------------------------


def receive_from(messages: list[dict[str, Any]], gate: asyncio.Event | None = None) -> Any:
    """A receive() that returns `messages` in order; once `gate` is set it reports a disconnect."""
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if gate is not None:
            await gate.wait()
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # never
        raise AssertionError

    return receive


async def test_wait_for_disconnect_skips_other_messages() -> None:
    messages = [{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}]
    seen: list[str] = []
    inner = receive_from(messages)

    async def receive() -> Any:
        message = await inner()
        seen.append(message["type"])
        return message

    await asyncio.wait_for(wait_for_disconnect(receive), 1)
    assert seen == ["http.request", "http.disconnect"]


async def test_run_until_disconnect_returns_the_result() -> None:
    async def work() -> int:
        return 42

    assert await run_until_disconnect(receive_from([]), work()) == 42


async def test_run_until_disconnect_cancels_the_work() -> None:
    gate = asyncio.Event()
    cancelled = asyncio.Event()

    async def work() -> int:
        try:
            gate.set()  # "the client disconnects" as soon as the work has started
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    with pytest.raises(ClientDisconnected):
        await asyncio.wait_for(run_until_disconnect(receive_from([], gate), work()), 2)
    assert cancelled.is_set()


async def test_cancelling_the_caller_cancels_the_work() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    outer = asyncio.create_task(run_until_disconnect(receive_from([]), work()))
    await started.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert cancelled.is_set()


async def test_broken_receive_does_not_cancel_the_work() -> None:
    async def receive() -> dict[str, Any]:
        raise RuntimeError("receive broke")

    async def work() -> str:
        await asyncio.sleep(0.02)
        return "done"

    assert await run_until_disconnect(receive, work()) == "done"


async def call_app(app: FastAPI, path: str, body: bytes, content_type: str, gate: asyncio.Event) -> list[Any]:
    sent: list[Any] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }

    async def send(message: Any) -> None:
        sent.append(message)

    receive = receive_from([{"type": "http.request", "body": body, "more_body": False}], gate)
    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_cancels_the_service(app: FastAPI, service: FakeService, stream: bool) -> None:
    service.delay = 30
    gate = asyncio.Event()
    body = json.dumps({"prompt": "p", "stream": stream}).encode()
    task = asyncio.create_task(call_app(app, "/v1/images/generations", body, "application/json", gate))
    await asyncio.wait_for(service.started.wait(), 2)
    gate.set()
    sent = await task
    assert service.cancelled
    bodies = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b"completed" not in bodies


async def test_event_stream_stops_when_send_fails() -> None:
    cancelled = asyncio.Event()

    async def run(on_plan: Any) -> ImageResult:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError

    sends = 0

    async def send(message: Any) -> None:
        nonlocal sends
        sends += 1
        if sends > 2:
            raise OSError("client went away")

    response = ImageEventStream(run, event_type="image_edit.completed", keepalive_seconds=0.01)
    await asyncio.wait_for(response({"type": "http"}, receive_from([]), send), 2)
    assert cancelled.is_set()


@pytest.mark.parametrize("delay", [0.0, 0.05])
async def test_event_stream_without_b64_is_an_error(delay: float) -> None:
    async def run(on_plan: Any) -> ImageResult:
        await asyncio.sleep(delay)
        return ImageResult(1, [OutputImage(url="http://x/y.png")], None, "png", "high", "opaque")

    messages: list[Any] = []

    async def send(message: Any) -> None:
        messages.append(message)

    response = ImageEventStream(run, event_type="image_edit.completed", keepalive_seconds=0.01)
    await response({"type": "http"}, receive_from([]), send)
    text = b"".join(m.get("body", b"") for m in messages).decode()
    assert "completed" not in text
    if delay == 0:  # nothing was sent yet: a plain 500
        assert messages[0]["status"] == 500 and json.loads(text)["error"]["type"] == "server_error"
    else:
        assert messages[0]["status"] == 200 and text.startswith(": keepalive\n\n")
        last = text.rstrip("\n").split("\n\n")[-1]
        assert last.startswith("event: error\ndata: ")
        assert json.loads(last.split("data: ", 1)[1])["error"]["type"] == "server_error"


# -- under a real server (uvicorn in a thread) -----------------------------------------------------


class SlowService:
    """Thread-safe flags: the app runs on uvicorn's loop, the test on its own."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    async def run(
        self, request: Any, *, request_id: str, base_url: str, dry_run: bool = False, on_plan: Any = None
    ) -> ImageResult:
        self.started.set()
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished.set()
        return ImageResult(1, [OutputImage(b64_json="AAAA")], "8x8", "png", "high", "opaque")


async def test_real_server_streams_keepalives_before_the_result(app: FastAPI) -> None:
    service = SlowService(delay=0.5)
    app.state.service = service
    with LocalServer(app) as server:
        async with (
            httpx.AsyncClient(base_url=server.url) as http,
            http.stream("POST", "/v1/images/generations", json={"prompt": "p", "stream": True}) as response,
        ):
            assert response.status_code == 200
            chunks = response.aiter_text()
            first = await asyncio.wait_for(anext(chunks), 2)
            assert first.startswith(": keepalive") and not service.finished.is_set()
            rest = "".join([chunk async for chunk in chunks])
    assert "event: image_generation.completed\ndata: " in rest


async def test_real_server_disconnect_cancels_the_service(app: FastAPI) -> None:
    service = SlowService(delay=30)
    app.state.service = service
    with LocalServer(app) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/images/generations", json={"prompt": "p"}, timeout=0.5)
        assert await asyncio.to_thread(service.cancelled.wait, 5)
    assert service.started.is_set() and not service.finished.is_set()


async def test_real_server_stream_disconnect_cancels_the_service(app: FastAPI) -> None:
    service = SlowService(delay=30)
    app.state.service = service
    with LocalServer(app) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            body = {"prompt": "p", "stream": True}
            async with http.stream("POST", "/v1/images/generations", json=body) as response:
                first = await asyncio.wait_for(anext(response.aiter_text()), 2)
                assert first.startswith(": keepalive")
            # leaving the block closes the connection mid-stream
        assert await asyncio.to_thread(service.cancelled.wait, 5)
    assert not service.finished.is_set()


async def test_route_pin_reaches_the_service(client: httpx.AsyncClient, service: FakeService) -> None:
    await client.post("/v1/images/generations", json={"prompt": "p"}, headers={"x-imagegate-route": "replicate"})
    assert service.last.route == "replicate"
    await client.post("/v1/images/generations?route=1", json={"prompt": "p"})
    assert service.last.route == "1"
    await client.post("/v1/images/generations", json={"prompt": "p"})
    assert service.last.route is None
