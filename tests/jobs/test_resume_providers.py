"""The resume hooks on the real adapters against the protocol fakes: a job's call persists the
upstream handle on acceptance; a detached stop leaves the upstream job running (no cancel); a new
run with the persisted handles follows the same upstream job (one submit in all); without
`detached`, abandoning the call still cancels upstream (the synchronous behaviour)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from tests.fakes.fal import FakeFal, FalScenario
from tests.fakes.replicate import FakeReplicate, ReplicateScenario
from tests.fakes.server import LocalServer, wait_until

from imagegate.providers.base import CallContext, Provider, Route
from imagegate.providers.fal import FalProvider
from imagegate.providers.replicate import ReplicateProvider
from imagegate.providers.resume import UpstreamHooks
from imagegate.settings import FalSettings, ProvidersSettings, ReplicateSettings, Settings


@pytest.fixture(scope="module")
def fal_server() -> Iterator[tuple[FakeFal, LocalServer]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv


@pytest.fixture(scope="module")
def replicate_server() -> Iterator[tuple[FakeReplicate, LocalServer]]:
    fake = FakeReplicate()
    with LocalServer(fake.app) as srv:
        yield fake, srv


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


class Upstream:
    def __init__(self, provider: Provider, route: Route, submits: Any, cancels: Any) -> None:
        self.provider, self.route, self.submits, self.cancels = provider, route, submits, cancels


@pytest.fixture(params=["fal", "replicate"])
def upstream(
    request: pytest.FixtureRequest,
    fal_server: tuple[FakeFal, LocalServer],
    replicate_server: tuple[FakeReplicate, LocalServer],
    http: httpx.AsyncClient,
) -> Upstream:
    if request.param == "fal":
        fal, srv = fal_server
        fal.reset()
        fal.scenario = FalScenario(queue_polls=0, progress_polls=30)
        config = FalSettings(key="test-fal-key", queue_url=srv.url, run_url=srv.url + "/sync", rest_url=srv.url,
                             poll_interval=0.02, poll_max_interval=0.02)
        provider: Provider = FalProvider(http, Settings(providers=ProvidersSettings(fal=config)))
        return Upstream(provider, Route("fal", "fal-ai/qwen-image"), lambda: fal.submits, lambda: fal.cancels)
    rep, rsrv = replicate_server
    rep.reset()
    rep.scenario = ReplicateScenario(starting_ticks=0, processing_ticks=30, wait_ticks=1)
    rconfig = ReplicateSettings(api_token="r8_test-token", base_url=rsrv.url + "/v1", poll_interval=0.02,
                                poll_max_interval=0.02)
    provider = ReplicateProvider(http, Settings(providers=ProvidersSettings(replicate=rconfig)))
    return Upstream(provider, Route("replicate", "qwen/qwen-image"), lambda: rep.creates, lambda: rep.cancels)


def call_ctx(hooks: UpstreamHooks | None) -> CallContext:
    return CallContext(request_id="job-1", deadline=time.monotonic() + 30, operation="generate", hooks=hooks)


async def test_detached_stop_then_resume_submits_once(upstream: Upstream) -> None:
    stored: dict[str, dict[str, Any]] = {}

    async def persist(key: str, handle: dict[str, Any]) -> None:
        stored[key] = handle

    payload = {"prompt": "a lighthouse"}
    first = UpstreamHooks(handles={}, persist=persist)
    task = asyncio.create_task(upstream.provider.run(dict(payload), upstream.route, call_ctx(first)))
    for _ in range(500):
        if stored:
            break
        await asyncio.sleep(0.01)
    assert len(stored) == 1 and len(upstream.submits()) == 1
    (handle,) = stored.values()
    assert handle["route"] == f"{upstream.route.provider}:{upstream.route.model}" and handle["request_id"]
    first.detached = True  # the worker stops; the job is not cancelled
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0.1)
    assert upstream.cancels() == []

    second = UpstreamHooks(handles=dict(stored), persist=persist)
    result = await upstream.provider.run(dict(payload), upstream.route, call_ctx(second))
    assert len(upstream.submits()) == 1 and upstream.cancels() == []
    assert result.images and result.request_id == handle["request_id"]


async def test_abandoned_job_call_is_cancelled_upstream(upstream: Upstream) -> None:
    async def persist(key: str, handle: dict[str, Any]) -> None:
        return None

    hooks = UpstreamHooks(handles={}, persist=persist)
    task = asyncio.create_task(upstream.provider.run({"prompt": "x"}, upstream.route, call_ctx(hooks)))
    await asyncio.to_thread(wait_until, lambda: upstream.submits(), 5.0)
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert await asyncio.to_thread(wait_until, lambda: upstream.cancels(), 5.0)
