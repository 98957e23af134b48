"""Never pay twice, for upstreams that give no handle to resume: a real `imagegate serve` is killed
with SIGKILL while an OpenAI-compatible upstream is still answering the job's one synchronous
request. The restarted process must not send that request again (the upstream may have run and
billed it): the job fails with `upstream_state_unknown`, and the upstream saw exactly one request."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tests.fakes.images import png_bytes
from tests.fakes.server import LocalServer
from tests.integration.gateway_process import GatewayProcess, write_config
from tests.integration.test_jobs_resume import submit, wait_job


class SlowOpenAI:
    """`POST /v1/images/generations` that takes `seconds` and counts every request."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.requests: list[dict[str, object]] = []
        self._lock = threading.Lock()
        self.app = Starlette(routes=[Route("/v1/images/generations", self.generate, methods=["POST"])])

    async def generate(self, request: Request) -> JSONResponse:
        body = await request.json()
        with self._lock:
            self.requests.append(body)
        await asyncio.sleep(self.seconds)
        data = base64.b64encode(png_bytes(512, 512)).decode()
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": data}]})


@pytest.fixture
def upstream() -> Iterator[tuple[SlowOpenAI, LocalServer]]:
    fake = SlowOpenAI(seconds=3.0)
    with LocalServer(fake.app) as srv:
        yield fake, srv


def config(tmp_path: Path, srv: LocalServer) -> Path:
    return write_config(
        tmp_path / "gateway.yaml",
        models={"qwen-image": {"routes": [{"provider": "openai", "model": "gpt-image-1"}]}},
        providers={"openai": {"api_key": "upstream-key", "base_url": srv.url + "/v1"}},
        jobs={"lease_seconds": 1.5, "poll_seconds": 0.1},
    )


def test_a_killed_synchronous_upstream_call_is_not_sent_again(
    tmp_path: Path, upstream: tuple[SlowOpenAI, LocalServer]
) -> None:
    fake, srv = upstream
    path = config(tmp_path, srv)
    first = GatewayProcess(tmp_path, path)
    try:
        first.wait_ready()
        job_id = submit(first.url)
        deadline = time.monotonic() + 10
        while not fake.requests:
            assert time.monotonic() < deadline, first.output()
            time.sleep(0.02)
        first.proc.kill()
        first.wait(30)
    finally:
        first.stop()

    second = GatewayProcess(tmp_path, path)
    try:
        second.wait_ready()
        job = wait_job(second.url, job_id, lambda job: job["status"] in ("succeeded", "failed"))
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "upstream_state_unknown", job
        assert "upstream-key" not in str(job)
        time.sleep(0.5)  # nothing else is on its way upstream
        assert len(fake.requests) == 1, fake.requests
    finally:
        second.stop()


def test_an_unresumable_call_that_finishes_succeeds_once(
    tmp_path: Path, upstream: tuple[SlowOpenAI, LocalServer]
) -> None:
    """The guard costs nothing when the worker lives: the job succeeds on its one request."""
    fake, srv = upstream
    fake.seconds = 0.1
    gateway = GatewayProcess(tmp_path, config(tmp_path, srv))
    try:
        gateway.wait_ready()
        job_id = submit(gateway.url)
        job = wait_job(gateway.url, job_id, lambda job: job["status"] in ("succeeded", "failed"))
        assert job["status"] == "succeeded", job
        assert len(fake.requests) == 1
        response = httpx.get(f"{gateway.url}/v1/images/jobs/{job_id}", timeout=5)
        assert response.json()["result"]["data"][0]["b64_json"]
    finally:
        gateway.stop()
