"""The Replicate adapter against FakeReplicate on a real local socket (httpx.AsyncClient, no mocks)."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from tests.fakes.images import png_bytes
from tests.fakes.replicate import FakeReplicate, ReplicateScenario, insufficient_credit, throttled
from tests.fakes.server import LocalServer, wait_until

from imagegate.core.errors import (
    ContentPolicyViolation,
    InsufficientCredit,
    RateLimited,
    UpstreamAuthFailed,
    UpstreamTimeout,
)
from imagegate.core.params import BuildContext
from imagegate.core.plan import apply_table
from imagegate.core.request import ImageRequest, InputImage
from imagegate.core.sizes import resolve_target
from imagegate.providers.base import CallContext, ProviderResult, Route
from imagegate.providers.replicate import ReplicateProvider
from imagegate.settings import ProvidersSettings, ReplicateSettings, Settings

EDIT = "qwen/qwen-image-edit-2511"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FakeReplicate, LocalServer]]:
    fake = FakeReplicate()
    with LocalServer(fake.app) as srv:
        yield fake, srv


@pytest.fixture
def fake(server: tuple[FakeReplicate, LocalServer]) -> FakeReplicate:
    fake = server[0]
    fake.reset()
    fake.scenario = ReplicateScenario()
    fake.script.clear()
    fake.token = "r8_test-token"
    return fake


@pytest.fixture
async def provider(server: tuple[FakeReplicate, LocalServer]) -> AsyncIterator[ReplicateProvider]:
    config = ReplicateSettings(
        api_token="r8_test-token",
        base_url=server[1].url + "/v1",
        wait_seconds=5,
        poll_interval=0.01,
        poll_max_interval=0.02,
    )
    async with httpx.AsyncClient() as http:
        yield ReplicateProvider(http, Settings(providers=ProvidersSettings(replicate=config)))


def ctx(seconds: float = 30.0) -> CallContext:
    return CallContext(request_id="req-1", deadline=time.monotonic() + seconds, operation="edit")


def picture(w: int, h: int) -> InputImage:
    return InputImage(data=png_bytes(w, h), format="png", width=w, height=h)


async def plan_edit(provider: ReplicateProvider, route: Route, **kw: Any) -> list[dict[str, Any]]:
    request = ImageRequest(operation="edit", prompt="make it blue", model="qwen-image-edit-2511", **kw)
    refs = await provider.prepare_images(request.images, route)
    target = resolve_target(
        size=request.size,
        aspect_ratio=request.aspect_ratio,
        resolution=request.resolution,
        presets=provider.size_presets(route.model),
    )
    table = provider.table(route.model, "edit")
    return apply_table(table, request, BuildContext("edit", target=target), image_refs=refs).payloads


async def run(provider: ReplicateProvider, payload: dict[str, Any], model: str = EDIT, **kw: Any) -> ProviderResult:
    return await provider.run(payload, Route("replicate", model), ctx(**kw))


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


async def test_edit_end_to_end_with_inline_input(provider: ReplicateProvider, fake: FakeReplicate) -> None:
    route = Route("replicate", EDIT)
    (payload,) = await plan_edit(provider, route, images=[picture(64, 48)], size="1536x864", seed=3)
    result = await run(provider, payload)
    created = fake.last_create
    assert created.body == {"input": payload}
    assert payload["image"][0].startswith("data:image/png;base64,")
    assert created.input["aspect_ratio"] == "16:9" and created.input["output_format"] == "png"
    assert created.prefer == "wait=5" and created.cancel_after == "30s"
    assert fake.uploads == []
    (image,) = result.images
    assert image.url is not None and image.content_type == "image/png"
    data = await provider.fetch(image)
    assert size_of(data) == (1360, 768)
    download = next(r for r in fake.requests if r.path.startswith("/files/"))
    assert download.headers["authorization"] == "Bearer r8_test-token"  # the base_url host is a Replicate host
    assert result.request_id == created.id


async def test_large_input_is_uploaded_and_referenced(provider: ReplicateProvider, fake: FakeReplicate) -> None:
    route = Route("replicate", EDIT, options={"inline_max_bytes": 100})
    (payload,) = await plan_edit(provider, route, images=[picture(96, 80)])
    (upload,) = fake.uploads
    assert upload.content_type == "image/png" and upload.name == "image-0.png"
    assert upload.metadata == {"uploaded_by": "imagegate"}
    assert payload["image"] == [f"{provider.settings.providers.replicate.base_url}/files/{upload.id}"]
    result = await run(provider, payload)
    assert size_of(await provider.fetch(result.images[0])) == (96, 80)  # match_input_image read the upload


async def test_slow_prediction_is_polled(provider: ReplicateProvider, fake: FakeReplicate) -> None:
    fake.scenario = ReplicateScenario(starting_ticks=2, processing_ticks=2, wait_ticks=0)
    result = await run(provider, {"prompt": "x", "output_format": "webp"}, "qwen/qwen-image")
    assert len(fake.polls) >= 1
    assert result.images[0].content_type == "image/webp"


async def test_early_output_while_processing_is_done(provider: ReplicateProvider, fake: FakeReplicate) -> None:
    fake.scenario = ReplicateScenario(processing_ticks=None, early_output=True, num_outputs=2)
    result = await run(provider, {"prompt": "x", "output_format": "png"}, "qwen/qwen-image")
    assert len(result.images) == 2 and fake.polls == []


async def test_pending_empty_output_is_not_done(provider: ReplicateProvider, fake: FakeReplicate) -> None:
    fake.scenario = ReplicateScenario(starting_ticks=0, processing_ticks=3, pending_output=[], wait_ticks=0)
    result = await run(provider, {"prompt": "x"}, "qwen/qwen-image")
    assert fake.polls and len(result.images) == 1


@pytest.mark.parametrize("kind", ["string", "data_uri"])
async def test_output_shapes(provider: ReplicateProvider, fake: FakeReplicate, kind: Any) -> None:
    fake.scenario = ReplicateScenario(output_kind=kind)
    result = await run(provider, {"prompt": "x", "output_format": "jpg", "aspect_ratio": "1:1"}, "qwen/qwen-image")
    (image,) = result.images
    assert image.content_type == "image/jpeg"
    if kind == "data_uri":
        assert image.data is None and image.url is not None and image.url.startswith("data:")  # decoded at delivery
    assert size_of(await provider.fetch(image)) == (1024, 1024)


async def test_flagged_prediction(provider: ReplicateProvider, fake: FakeReplicate) -> None:
    fake.scenario = ReplicateScenario.flagged()
    with pytest.raises(ContentPolicyViolation):
        await run(provider, {"prompt": "x"}, "qwen/qwen-image")
    assert fake.cancels == []


async def test_cancelled_run_cancels_the_prediction(provider: ReplicateProvider, fake: FakeReplicate) -> None:
    fake.scenario = ReplicateScenario.hang(wait_ticks=0)
    task = asyncio.create_task(run(provider, {"prompt": "x"}, "qwen/qwen-image"))
    while len(fake.polls) < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert wait_until(lambda: fake.cancels == [fake.last_create.id])
    assert fake.predictions[fake.last_create.id].final_status == "canceled"


async def test_gateway_deadline_times_out_and_cancels(provider: ReplicateProvider, fake: FakeReplicate) -> None:
    fake.scenario = ReplicateScenario.hang(wait_ticks=0)
    with pytest.raises(UpstreamTimeout):
        await run(provider, {"prompt": "x"}, "qwen/qwen-image", seconds=0.2)
    assert fake.cancels == [fake.last_create.id]
    assert fake.last_create.cancel_after == "5s"


async def test_http_errors(provider: ReplicateProvider, fake: FakeReplicate) -> None:
    fake.scenario = ReplicateScenario(create_errors=[throttled(3), throttled(2, header=False), insufficient_credit()])
    with pytest.raises(RateLimited) as header:
        await run(provider, {"prompt": "x"}, "qwen/qwen-image")
    with pytest.raises(RateLimited) as body:
        await run(provider, {"prompt": "x"}, "qwen/qwen-image")
    with pytest.raises(InsufficientCredit):
        await run(provider, {"prompt": "x"}, "qwen/qwen-image")
    assert (header.value.retry_after, body.value.retry_after) == (3.0, 2.0)
    assert len(fake.rejected_creates) == 3 and fake.creates == []
    fake.token = "r8_other"
    with pytest.raises(UpstreamAuthFailed) as auth:
        await run(provider, {"prompt": "x"}, "qwen/qwen-image")
    assert "r8_test-token" not in auth.value.message
