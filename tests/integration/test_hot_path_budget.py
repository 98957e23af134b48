"""The work one passthrough generation costs the gateway, counted (not timed): the asyncio tasks it
creates and the upstream requests it makes. A fal queue job that is done at the first status poll
is three upstream requests (submit, status, result) and two tasks besides the request's own: the
disconnect watcher and the submit (it finishes even if the request is cancelled, so that its job can
be cancelled). The upstream client makes none: a request is written in the caller's task. A
sync-mode job is one request and one task (the watcher)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import gateway_settings
from tests.fakes.fal import FakeFal, FalScenario, fal_provider_settings
from tests.fakes.server import LocalServer

from imagegate.app import create_app

JOBS = 5


@pytest.fixture(scope="module")
def fal() -> Iterator[tuple[FakeFal, LocalServer]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv


def _app(tmp_path: Path, fal_url: str, mode: str) -> Any:
    settings = gateway_settings(
        tmp_path,
        delivery={"url_mode": "passthrough"},
        models={"qwen-image": {"routes": [{"provider": "fal", "model": "fal-ai/qwen-image"}]}},
        providers={"fal": fal_provider_settings(fal_url, mode=mode)},
    )
    return create_app(settings)


@pytest.mark.parametrize(("mode", "upstream_per_job", "tasks_per_job"), [("queue", 3, 2), ("sync", 1, 1)])
async def test_a_passthrough_job_costs_its_upstream_requests_and_no_more_tasks(
    tmp_path: Path, fal: tuple[FakeFal, LocalServer], mode: str, upstream_per_job: int, tasks_per_job: int
) -> None:
    fake, srv = fal
    fake.scenario = FalScenario.instant()
    app = _app(tmp_path, srv.url, mode)
    loop = asyncio.get_running_loop()
    created: list[str] = []
    previous = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any) -> asyncio.Future[Any]:
        created.append(getattr(coro, "__qualname__", repr(coro)))
        if previous is not None:
            return previous(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    body = {"model": "qwen-image", "prompt": "a lighthouse at dusk", "n": 1, "response_format": "url"}
    transport = httpx.ASGITransport(app=app)  # runs the app in the caller's task: no task of its own
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        warm = await client.post("/v1/images/generations", json=body)  # connections to the fake are open now
        assert warm.status_code == 200, warm.text
        fake.reset()
        loop.set_task_factory(counting)  # type: ignore[arg-type]
        try:
            for _ in range(JOBS):
                response = await client.post("/v1/images/generations", json=body)
                assert response.status_code == 200, response.text
                assert response.json()["data"][0]["url"].startswith(srv.url)
        finally:
            loop.set_task_factory(previous)
    await app.state.http.aclose()
    assert len(fake.requests) == JOBS * upstream_per_job
    assert len(created) == JOBS * tasks_per_job, created
