"""Credentials go only to the configured upstream hosts, whatever a response names.

A fal submit response whose `status_url`/`response_url`/`cancel_url` point at another host is refused:
that host receives nothing, the job is cancelled through the configured queue host and never submitted
again. Replicate `urls.get`/`urls.cancel` on another host are replaced by the canonical URLs on the
configured base_url.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tests.conftest import gateway_settings
from tests.fakes.fal import FakeFal, FalScenario
from tests.fakes.replicate import FakeReplicate, ReplicateScenario
from tests.fakes.server import LocalServer, wait_until

from imagegate.app import create_app


class Recorder:
    """A foreign host: records every request (and its Authorization header), answers 200 {}."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.app = Starlette(routes=[Route("/{path:path}", self._any, methods=["GET", "POST", "PUT"])])

    async def _any(self, request: Request) -> Response:
        self.seen.append((request.url.path, request.headers.get("authorization")))
        return JSONResponse({})


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[FakeFal, FakeReplicate, Recorder, dict[str, str]]]:
    fal, replicate, foreign = FakeFal(), FakeReplicate(), Recorder()
    with LocalServer(fal.app) as fs, LocalServer(replicate.app) as rs, LocalServer(foreign.app) as other:
        yield fal, replicate, foreign, {"fal": fs.url, "replicate": rs.url, "foreign": other.url}


@pytest.fixture
async def client(
    tmp_path: Path, hosts: tuple[FakeFal, FakeReplicate, Recorder, dict[str, str]]
) -> AsyncIterator[httpx.AsyncClient]:
    fal, replicate, foreign, urls = hosts
    fal.reset()
    replicate.reset()
    foreign.seen.clear()
    fal.foreign_base = replicate.foreign_base = urls["foreign"] + "/"
    settings = gateway_settings(
        tmp_path,
        routing={"deadline_seconds": 10, "backoff_base": 0.01, "backoff_max": 0.02},
        models={"fal-q": {"routes": [{"provider": "fal", "model": "fal-ai/qwen-image"},
                                     {"provider": "replicate", "model": "qwen/qwen-image"}]},
                "rep": {"routes": [{"provider": "replicate", "model": "qwen/qwen-image"}]}},
        providers={
            "fal": {"key": "test-fal-key", "queue_url": urls["fal"], "run_url": urls["fal"] + "/sync",
                    "rest_url": urls["fal"], "poll_interval": 0.01},
            "replicate": {"api_token": "r8_test-token", "base_url": urls["replicate"] + "/v1", "wait_seconds": 1,
                          "poll_interval": 0.01, "poll_max_interval": 0.02},
        },
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30
    ) as c:
        yield c


async def test_fal_urls_on_another_host_never_get_the_key(
    client: httpx.AsyncClient, hosts: tuple[FakeFal, FakeReplicate, Recorder, dict[str, str]]
) -> None:
    fal, replicate, foreign, _ = hosts
    fal.scenario = FalScenario.hang()
    response = await client.post("/v1/images/generations", json={"model": "fal-q", "prompt": "p"})
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_error" and "not a configured fal host" in error["message"]
    assert response.headers["x-should-retry"] == "false"
    assert foreign.seen == []  # nothing at all went to the named host
    assert len(fal.submits) == 1 and replicate.creates == []  # accepted: no resubmit, no fallback
    # cancelled through the configured host
    assert wait_until(lambda: fal.cancels == [fal.last_submit.request_id], timeout=5)


async def test_replicate_urls_on_another_host_are_replaced_by_the_configured_ones(
    client: httpx.AsyncClient, hosts: tuple[FakeFal, FakeReplicate, Recorder, dict[str, str]]
) -> None:
    _, replicate, foreign, _ = hosts
    replicate.scenario = ReplicateScenario(wait_ticks=0, starting_ticks=1, processing_ticks=1)
    response = await client.post("/v1/images/generations",
                                 json={"model": "rep", "prompt": "p", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    assert foreign.seen == []
    assert len(replicate.creates) == 1 and len(replicate.polls) >= 1
