"""Crash and resume: a real `imagegate serve` is killed with SIGKILL while the fake fal holds the
job; a restarted process on the same data directory resumes polling the same upstream job (the
fake sees exactly one submit, no cancel) and the job succeeds. Also: a graceful stop (SIGTERM)
leaves the upstream job running for the next process."""

from __future__ import annotations

import base64
import io
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from PIL import Image
from tests.fakes.fal import FakeFal, FalScenario
from tests.fakes.server import LocalServer
from tests.integration.gateway_process import CliProcess, GatewayProcess, write_config
from tests.redis_support import redis_prefix, redis_url

__all__ = ["redis_prefix", "redis_url"]

ASYNC = {"prefer": "respond-async"}


@pytest.fixture
def fal() -> Iterator[tuple[FakeFal, LocalServer]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv


def config(tmp_path: Path, srv: LocalServer) -> Path:
    return write_config(
        tmp_path / "gateway.yaml",
        providers={
            "fal": {
                "key": "test-fal-key", "queue_url": srv.url, "run_url": srv.url + "/sync", "rest_url": srv.url,
                "poll_interval": 0.05, "poll_max_interval": 0.1, "status_stream": False,
            }
        },
        jobs={"lease_seconds": 1.5, "poll_seconds": 0.1},
    )


def get_job(url: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/images/jobs/{job_id}", timeout=5)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_job(url: str, job_id: str, check: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(url, job_id)
        if check(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def submit(url: str) -> str:
    response = httpx.post(
        f"{url}/v1/images/generations",
        json={"model": "qwen-image", "prompt": "a lighthouse", "size": "512x512", "response_format": "b64_json"},
        headers=ASYNC,
        timeout=10,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def submit_to_one(url: str, workers: list[WorkerProcess]) -> tuple[str, WorkerProcess, WorkerProcess]:
    """Submit a job, wait until its upstream job exists: (job id, the worker holding it, the other)."""
    job_id = submit(url)
    wait_job(url, job_id, lambda job: job["upstream_request_id"] is not None)
    holder = next(w for w in workers if f"job {job_id}: in_progress" in w.output())
    return job_id, holder, next(w for w in workers if w is not holder)


@pytest.mark.parametrize("stop", ["kill", "term"])
def test_restart_resumes_the_same_upstream_job(tmp_path: Path, fal: tuple[FakeFal, LocalServer], stop: str) -> None:
    fake, srv = fal
    fake.scenario = FalScenario(queue_polls=0, progress_polls=40)  # about 4 s of polling at 0.1 s
    path = config(tmp_path, srv)
    first = GatewayProcess(tmp_path, path)
    try:
        first.wait_ready()
        job_id = submit(first.url)
        accepted = wait_job(first.url, job_id, lambda job: job["upstream_request_id"] is not None)
        assert accepted["status"] == "in_progress" and accepted["provider"] == "fal"
        assert len(fake.submits) == 1 and fake.submits[0].request_id == accepted["upstream_request_id"]
        if stop == "kill":
            first.proc.kill()
        else:
            first.terminate()
        first.wait(30)
    finally:
        first.stop()
    polls_before = len(fake.status_polls)
    assert fake.cancels == []  # neither a crash nor a graceful stop cancels the upstream job

    second = GatewayProcess(tmp_path, path)
    try:
        second.wait_ready()
        job = wait_job(second.url, job_id, lambda job: job["status"] in ("succeeded", "failed"))
        assert job["status"] == "succeeded", (job, second.output())
        assert len(fake.submits) == 1 and fake.cancels == [] and not fake.rejected_submits
        assert len(fake.status_polls) > polls_before  # the second process followed the same job
        assert job["upstream_request_id"] == fake.submits[0].request_id and job["attempts"] == 2
        image = Image.open(io.BytesIO(base64.b64decode(job["result"]["data"][0]["b64_json"])))
        assert image.size == (512, 512)
    finally:
        second.stop()


class WorkerProcess(CliProcess):
    """`imagegate worker` (one job at a time) on its own data directory under `tmp_path`."""

    def __init__(self, tmp_path: Path, config: Path, name: str, data: str = "data") -> None:
        args = ["worker", "--config", str(config), "--concurrency", "1"]
        super().__init__(tmp_path, args, f"worker-{name}", data=data)


@pytest.mark.parametrize("engine", ["sqlite", "redis"])
def test_worker_processes_resume_a_killed_workers_job(
    request: pytest.FixtureRequest, tmp_path: Path, fal: tuple[FakeFal, LocalServer], engine: str
) -> None:
    """API with `jobs.workers: 0` plus two `imagegate worker` processes: the worker holding the job
    is SIGKILLed mid-job; the other one resumes the same upstream job. With Redis as the engine,
    each process has a data directory of its own: the job can only travel through Redis."""
    fake, srv = fal
    fake.scenario = FalScenario(queue_polls=0, progress_polls=40)
    path = config(tmp_path, srv)
    overrides = yaml.safe_load(path.read_text("utf-8"))
    datas = {"a": "data", "b": "data"}
    if engine == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        overrides["redis"] = {"url": request.getfixturevalue("redis_url"), "key_prefix": prefix}
        path = write_config(tmp_path / "gateway-redis.yaml", **overrides)
        datas = {"a": "data-a", "b": "data-b"}
    api_path = write_config(tmp_path / "api.yaml", **overrides | {"jobs": {"workers": 0}})
    api = GatewayProcess(tmp_path, api_path)
    workers = [WorkerProcess(tmp_path, path, name, datas[name]) for name in ("a", "b")]
    try:
        api.wait_ready()
        job_id, holder, other = submit_to_one(api.url, workers)
        holder.proc.kill()
        holder.proc.wait(10)
        job = wait_job(api.url, job_id, lambda job: job["status"] in ("succeeded", "failed"))
        assert job["status"] == "succeeded", (job, other.output())
        assert len(fake.submits) == 1 and fake.cancels == []
        assert f"job {job_id}: in_progress (attempt 2" in other.output()
        assert "fal resuming" in other.output()
        if engine == "redis":
            assert not list(tmp_path.glob("data*/**/jobs.db")) and not list(tmp_path.glob("*.db"))
            assert job_id.encode() in redis.Redis.from_url(overrides["redis"]["url"]).keys(f"{prefix}jobs:job:*")[0]
    finally:
        for worker in workers:
            worker.stop()
        api.stop()


def test_a_paused_redis_worker_leaves_its_reclaimed_job_alone(
    tmp_path: Path, fal: tuple[FakeFal, LocalServer], redis_url: str, redis_prefix: str
) -> None:
    """Two `imagegate worker` processes on Redis: the one holding the job is paused (SIGSTOP) for
    longer than the lease; the other reclaims the job and resumes the same upstream job. The paused
    one, continued (SIGCONT), lets it go: one submit, no cancel upstream, the job succeeds once."""
    fake, srv = fal
    fake.scenario = FalScenario(queue_polls=0, progress_polls=60)
    overrides = yaml.safe_load(config(tmp_path, srv).read_text("utf-8"))
    overrides["redis"] = {"url": redis_url, "key_prefix": redis_prefix}
    path = write_config(tmp_path / "gateway-redis.yaml", **overrides)
    api = GatewayProcess(tmp_path, write_config(tmp_path / "api.yaml", **overrides | {"jobs": {"workers": 0}}))
    workers = [WorkerProcess(tmp_path, path, name, f"data-{name}") for name in ("a", "b")]
    try:
        api.wait_ready()
        job_id, holder, other = submit_to_one(api.url, workers)
        holder.proc.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 20
            while f"job {job_id}: in_progress (attempt 2" not in other.output():
                assert time.monotonic() < deadline, other.output()
                time.sleep(0.05)
        finally:
            holder.proc.send_signal(signal.SIGCONT)
        job = wait_job(api.url, job_id, lambda job: job["status"] in ("succeeded", "failed"))
        assert job["status"] == "succeeded", (job, other.output())
        deadline = time.monotonic() + 10
        while "lost its lease" not in holder.output():
            assert time.monotonic() < deadline, holder.output()
            time.sleep(0.05)
        time.sleep(0.5)
        assert len(fake.submits) == 1 and fake.cancels == [] and not fake.rejected_submits
        assert get_job(api.url, job_id)["attempts"] == 2 and holder.proc.poll() is None
        assert f"job {job_id}: succeeded" in other.output() and f"job {job_id}: succeeded" not in holder.output()
    finally:
        for worker in workers:
            worker.stop()
        api.stop()
