"""FalProvider against the protocol-faithful FakeFal on 127.0.0.1, with a real httpx.AsyncClient:
table -> prepare_images -> apply_table -> run -> fetch, as the service will call it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from tests.fakes.fal import FakeFal, FalScenario, rate_limited, validation_error
from tests.fakes.images import image_info, png_bytes
from tests.fakes.server import LocalServer, wait_until

from imagegate.core.errors import (
    ContentPolicyViolation,
    InvalidRequest,
    ProviderUnavailable,
    RateLimited,
    UpstreamAuthFailed,
    UpstreamTimeout,
)
from imagegate.core.params import BuildContext
from imagegate.core.plan import apply_table
from imagegate.core.request import ImageRequest, InputImage, Operation
from imagegate.core.sizes import Size, resolve_target
from imagegate.providers.base import CallContext, ProviderResult, Route
from imagegate.providers.fal import FalProvider
from imagegate.settings import FalSettings, ProvidersSettings, Settings

EDIT = "fal-ai/qwen-image-edit-2511"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FakeFal, LocalServer]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv


@pytest.fixture
def fake(server: tuple[FakeFal, LocalServer]) -> FakeFal:
    fal, _ = server
    fal.reset()
    fal.scenario = FalScenario()
    fal.model_scenarios.clear()
    fal.script.clear()
    return fal


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
def make(server: tuple[FakeFal, LocalServer], http: httpx.AsyncClient) -> Any:
    _, srv = server

    def build(**fal: Any) -> FalProvider:
        values = {
            "key": "test-fal-key",
            "queue_url": srv.url,
            "run_url": srv.url + "/sync",
            "rest_url": srv.url,
            "poll_interval": 0.01,
            "poll_max_interval": 0.02,
            **fal,
        }
        return FalProvider(http, Settings(providers=ProvidersSettings(fal=FalSettings(**values))))

    return build


def ctx(seconds: float = 10.0, operation: Operation = "edit") -> CallContext:
    return CallContext(request_id="gw-1", deadline=time.monotonic() + seconds, operation=operation)


async def call(
    provider: FalProvider, request: ImageRequest, route: Route, *, seconds: float = 10.0
) -> list[ProviderResult]:
    """What the service does for one route: table, inputs, payloads, one run per payload."""
    table = provider.table(route.model, request.operation)
    presets = provider.size_presets(route.model)
    assert presets is not None
    first = request.images[0] if request.images else None
    input_size = Size(first.width, first.height) if first and first.width and first.height else None
    target = resolve_target(size=request.size, aspect_ratio=request.aspect_ratio, resolution=request.resolution,
                            presets=presets, input_size=input_size)
    refs = await provider.prepare_images(request.images, route)
    plan = apply_table(table, request, BuildContext(request.operation, target, input_size), image_refs=refs)
    return [await provider.run(payload, route, ctx(seconds, request.operation)) for payload in plan.payloads]


def edit(*images: InputImage, model: str = EDIT, **fields: Any) -> ImageRequest:
    return ImageRequest(operation="edit", prompt="make it blue", model="qwen-image-edit-2511", images=list(images),
                        **fields)


def png(w: int = 64, h: int = 48) -> InputImage:
    return InputImage(data=png_bytes(w, h), format="png", width=w, height=h)


async def test_queue_edit_with_a_data_uri(make: Any, fake: FakeFal) -> None:
    provider = make()
    image = png()
    [result] = await call(provider, edit(image, seed=5), Route("fal", EDIT))

    job = fake.last_submit
    assert job.mode == "queue" and job.endpoint_id == EDIT
    assert job.input == {"prompt": "make it blue", "image_urls": [image.data_uri()], "seed": 5, "num_images": 1}
    assert job.headers["authorization"] == "Key test-fal-key"
    assert float(job.headers["x-fal-request-timeout"]) > 8
    assert result.request_id == job.request_id and result.seed == 5
    # The first look finds the job queued (the fake's default scenario); the stream, the default, follows it.
    assert fake.status_polls == [job.request_id] and fake.stream_opens == [job.request_id]
    assert fake.result_fetches == [job.request_id] and not fake.cancels
    [out] = result.images
    assert (out.width, out.height, out.content_type) == (64, 48, "image/png")
    assert image_info(await provider.fetch(out)) == ("PNG", 64, 48)  # the model kept the input size


async def test_large_inputs_are_uploaded(make: Any, fake: FakeFal) -> None:
    provider = make(inline_max_bytes=100)
    big, other = png(300, 200), png(200, 300)
    [result] = await call(provider, edit(big, other, size="1024x576", n=2), Route("fal", EDIT))

    assert [u.storage_type for u in fake.uploads] == ["fal-cdn-v3", "fal-cdn-v3"]
    assert sorted(u.data for u in fake.uploads if u.data) == sorted([big.data, other.data])  # type: ignore[type-var]
    assert all(u.put_content_type == "image/png" for u in fake.uploads)
    urls = {u.file_name: u.file_url for u in fake.uploads}
    assert fake.last_submit.input["image_urls"] == [urls["input-0.png"], urls["input-1.png"]]
    assert fake.last_submit.input["image_size"] == "landscape_16_9"
    assert [(i.width, i.height) for i in result.images] == [(1024, 576)] * 2


async def test_status_stream(make: Any, fake: FakeFal) -> None:
    fake.scenario = FalScenario(queue_polls=2, progress_polls=2, stream_interval=0.005)
    [result] = await call(make(status_stream=True), edit(png()), Route("fal", EDIT))
    # The first look finds the job queued; the stream follows it from there (no more polls).
    assert fake.stream_opens == [fake.last_submit.request_id] and len(fake.status_polls) == 1
    assert len(result.images) == 1


async def test_sync_route_with_sync_mode(make: Any, fake: FakeFal) -> None:
    route = Route("fal", "fal-ai/qwen-image", options={"mode": "sync", "sync_mode": True})
    request = ImageRequest(operation="generate", prompt="a cat", model="qwen-image", aspect_ratio="16:9",
                           output_format="jpeg")
    provider = make()
    [result] = await call(provider, request, route)
    assert fake.submits == [] and len(fake.runs) == 1
    assert fake.runs[0].input == {"prompt": "a cat", "output_format": "jpeg", "image_size": {"width": 1365,
                                  "height": 768}, "num_images": 1, "sync_mode": True}
    [out] = result.images
    # kept as a data URL (decoded off the event loop, at delivery)
    assert out.data is None and out.url is not None and out.url.startswith("data:image/jpeg;base64,")
    assert out.content_type == "image/jpeg"
    assert image_info(await provider.fetch(out)) == ("JPEG", 1365, 768)


async def test_single_image_model(make: Any, fake: FakeFal) -> None:
    image = png()
    await call(make(), edit(image), Route("fal", "fal-ai/qwen-image-edit"))
    assert fake.last_submit.input == {"prompt": "make it blue", "image_url": image.data_uri(), "num_images": 1}


async def test_content_policy(make: Any, fake: FakeFal) -> None:
    fake.scenario = FalScenario.content_policy()
    with pytest.raises(ContentPolicyViolation) as err:
        await call(make(), edit(png()), Route("fal", EDIT))
    assert (err.value.status, err.value.code, err.value.param) == (400, "content_policy_violation", "prompt")


async def test_validation_error_names_the_openai_param(make: Any, fake: FakeFal) -> None:
    fake.scenario = FalScenario.instant(result_error=validation_error("guidance_scale", "Input should be <= 20"))
    with pytest.raises(InvalidRequest) as err:
        await call(make(), edit(png(), cfg_scale=10), Route("fal", EDIT))
    assert (err.value.param, err.value.message) == ("cfg_scale", "Input should be <= 20")


async def test_runner_disconnected_after_acceptance_is_never_resubmitted(make: Any, fake: FakeFal) -> None:
    fake.scenario = FalScenario.runner_disconnected()
    with pytest.raises(ProviderUnavailable) as err:
        await call(make(), edit(png()), Route("fal", EDIT))
    assert err.value.accepted and not err.value.retryable and err.value.fallback


async def test_rate_limited_submit(make: Any, fake: FakeFal) -> None:
    fake.scenario = FalScenario(always_fail_submit=rate_limited(3))
    with pytest.raises(RateLimited) as err:
        await call(make(), edit(png()), Route("fal", EDIT))
    assert err.value.retryable and err.value.retry_after == 3.0 and len(fake.rejected_submits) == 1


async def test_wrong_key(make: Any, fake: FakeFal) -> None:
    with pytest.raises(UpstreamAuthFailed) as err:
        await call(make(key="wrong-key"), edit(png()), Route("fal", EDIT))
    assert "wrong-key" not in err.value.message and err.value.status == 502


async def test_cancelled_run_cancels_the_job(make: Any, fake: FakeFal) -> None:
    fake.scenario = FalScenario.hang(queue_polls=0)
    task = asyncio.create_task(call(make(), edit(png()), Route("fal", EDIT)))
    for _ in range(200):
        if fake.status_polls:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(wait_until, lambda: fake.cancels)
    job = fake.last_submit
    assert fake.cancels == [job.request_id] and job.cancelled


async def test_deadline_cancels_the_job(make: Any, fake: FakeFal) -> None:
    fake.scenario = FalScenario.hang(queue_polls=0)
    with pytest.raises(UpstreamTimeout):
        await call(make(), edit(png()), Route("fal", EDIT), seconds=0.3)
    assert fake.cancels == [fake.last_submit.request_id]
