"""Async jobs against the fake fal and the fake Replicate on 127.0.0.1, through an in-process gateway:

- outage: fal (or Replicate) answers 503 to every submit (create) for a while; an async job waits
  (requeued with backoff) and succeeds once the provider recovers, while a synchronous request in the
  same window fails fast;
- client errors fail the job at once (no requeue);
- drain: many jobs with `max_concurrent_jobs: 8` -> exactly one submit per job, never more than
  8 jobs in flight upstream (counted on the fake: from submit to result fetch).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from tests.conftest import gateway_settings
from tests.fakes.fal import FakeFal, FalScenario, content_policy_violation, runner_scheduling_failure
from tests.fakes.replicate import FakeReplicate, ReplicateScenario, service_unavailable
from tests.fakes.server import LocalServer
from tests.redis_support import redis_prefix, redis_url

from imagegate.app import create_app

ASYNC = {"prefer": "respond-async"}


@pytest.fixture(scope="module")
def fal_server() -> Iterator[tuple[FakeFal, LocalServer]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv


@pytest.fixture
def fake(fal_server: tuple[FakeFal, LocalServer]) -> FakeFal:
    fal, _ = fal_server
    fal.reset()
    fal.scenario = FalScenario()
    return fal


@pytest.fixture(scope="module")
def replicate_server() -> Iterator[tuple[FakeReplicate, LocalServer]]:
    fake = FakeReplicate()
    with LocalServer(fake.app) as srv:
        yield fake, srv


@pytest.fixture
def replicate(replicate_server: tuple[FakeReplicate, LocalServer]) -> FakeReplicate:
    fake, _ = replicate_server
    fake.reset()
    fake.script.clear()
    fake.scenario = ReplicateScenario.instant()
    return fake


__all__ = ["redis_prefix", "redis_url"]


def make_app(
    tmp_path: Path, srv: LocalServer, redis: dict[str, Any] | None = None,
    replicate: LocalServer | None = None, **fal: Any,
) -> FastAPI:
    providers: dict[str, Any] = {
        "fal": {
            "key": "test-fal-key", "queue_url": srv.url, "run_url": srv.url + "/sync", "rest_url": srv.url,
            "poll_interval": 0.02, "poll_max_interval": 0.05, "status_stream": False, **fal,
        }
    }
    extra: dict[str, Any] = {}
    if replicate is not None:
        providers["replicate"] = {
            "api_token": "r8_test-token", "base_url": replicate.url + "/v1", "wait_seconds": 1,
            "poll_interval": 0.02, "poll_max_interval": 0.05,
        }
        extra["models"] = {  # one route each: a fal outage must not fall back to Replicate, nor the reverse
            "qwen-image": {"routes": [{"provider": "fal", "model": "fal-ai/qwen-image"}]},
            "rep": {"routes": [{"provider": "replicate", "model": "qwen/qwen-image"}]},
        }
    settings = gateway_settings(
        tmp_path,
        providers=providers,
        routing={"max_attempts": 1, "backoff_base": 0.01},
        jobs={"workers": 16, "poll_seconds": 0.05, "backoff_base": 0.1, "backoff_max": 0.3},
        **({"redis": redis} if redis else {}),
        **extra,
    )
    return create_app(settings)


@pytest.fixture(params=["sqlite", "redis"])
async def gateway(
    request: pytest.FixtureRequest, tmp_path: Path, fal_server: tuple[FakeFal, LocalServer],
    replicate_server: tuple[FakeReplicate, LocalServer],
) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway on each job engine: embedded SQLite, and Redis (`redis.url` set)."""
    redis = None
    if request.param == "redis":
        redis = {"url": request.getfixturevalue("redis_url"), "key_prefix": request.getfixturevalue("redis_prefix")}
    app = make_app(tmp_path, fal_server[1], redis, replicate_server[1], max_concurrent_jobs=8)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30) as client:
            yield client


BODY = {"model": "qwen-image", "prompt": "a lighthouse", "size": "256x256", "response_format": "b64_json"}


async def submit(client: httpx.AsyncClient, model: str = "qwen-image") -> str:
    response = await client.post("/v1/images/generations", json={**BODY, "model": model}, headers=ASYNC)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def read_events(client: httpx.AsyncClient, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The job's SSE stream to its end, as (event, data) pairs."""
    events: list[tuple[str, dict[str, Any]]] = []
    async with client.stream("GET", f"/v1/images/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        name = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


async def wait_done(client: httpx.AsyncClient, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = (await client.get(f"/v1/images/jobs/{job_id}")).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)


async def test_outage_requeues_then_succeeds_while_sync_fails_fast(gateway: httpx.AsyncClient, fake: FakeFal) -> None:
    fake.scenario = FalScenario.instant(always_fail_submit=runner_scheduling_failure())
    job_id = await submit(gateway)
    started = time.monotonic()
    sync = await gateway.post("/v1/images/generations", json=BODY)
    assert sync.status_code == 503 and time.monotonic() - started < 5
    assert sync.json()["error"]["code"] == "provider_unavailable"
    await asyncio.sleep(0.8)  # a few requeues
    job: dict[str, Any] = (await gateway.get(f"/v1/images/jobs/{job_id}")).json()
    assert job["status"] in ("queued", "in_progress") and job["attempts"] >= 2
    assert len(fake.rejected_submits) >= 3 and fake.submits == []
    fake.scenario = FalScenario.instant()  # fal recovers
    job = await wait_done(gateway, job_id)
    assert job["status"] == "succeeded" and job["error"] is None, job
    assert len(fake.submits) == 1


async def test_replicate_outage_requeues_then_succeeds_while_sync_fails_fast(
    gateway: httpx.AsyncClient, replicate: FakeReplicate
) -> None:
    replicate.scenario = ReplicateScenario.instant(always_fail_create=service_unavailable())
    job_id = await submit(gateway, "rep")
    started = time.monotonic()
    sync = await gateway.post("/v1/images/generations", json={**BODY, "model": "rep"})
    assert sync.status_code == 503 and time.monotonic() - started < 5, sync.text
    assert sync.json()["error"]["code"] == "provider_unavailable"
    await asyncio.sleep(0.8)  # a few requeues
    job: dict[str, Any] = (await gateway.get(f"/v1/images/jobs/{job_id}")).json()
    assert job["status"] in ("queued", "in_progress") and job["attempts"] >= 2, job
    assert len(replicate.rejected_creates) >= 3 and replicate.creates == []
    replicate.scenario = ReplicateScenario.instant()  # Replicate recovers
    job = await wait_done(gateway, job_id)
    assert job["status"] == "succeeded" and job["error"] is None, job
    assert job["provider"] == "replicate" and job["upstream_request_id"] == replicate.last_create.id
    assert len(replicate.creates) == 1
    assert len(job["result"]["data"]) == 1 and job["result"]["data"][0]["b64_json"]


async def test_client_error_fails_at_once(gateway: httpx.AsyncClient, fake: FakeFal) -> None:
    fake.scenario = FalScenario.instant(submit_errors=[content_policy_violation()])
    job = await wait_done(gateway, await submit(gateway))
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] == "content_policy_violation" and job["error"]["type"] == "invalid_request_error"


async def test_drain_one_submit_per_job_and_at_most_8_in_flight(gateway: httpx.AsyncClient, fake: FakeFal) -> None:
    fake.scenario = FalScenario(queue_polls=1, progress_polls=3)  # ~0.2 s of upstream time per job
    count = 120
    ids = [await submit(gateway) for _ in range(count)]
    jobs = [await wait_done(gateway, job_id, timeout=120) for job_id in ids]
    assert all(job["status"] == "succeeded" for job in jobs), [j for j in jobs if j["status"] != "succeeded"][:1]
    assert len(fake.submits) == count and not fake.rejected_submits
    assert len({job["upstream_request_id"] for job in jobs}) == count
    assert fake.peak_in_flight() <= 8 and fake.peak_in_flight() >= 4



async def test_events_show_the_upstream_acceptance(gateway: httpx.AsyncClient, fake: FakeFal) -> None:
    fake.scenario = FalScenario(queue_polls=2, progress_polls=6)
    events = await read_events(gateway, await submit(gateway))
    names = [name for name, _ in events]
    assert names[-1] == "succeeded" and names.count("succeeded") == 1
    accepted = [data for name, data in events if name == "in_progress" and data["upstream_request_id"]]
    assert accepted and accepted[0]["provider"] == "fal"
    assert accepted[0]["upstream_request_id"] == fake.submits[0].request_id


async def test_events_show_fal_queue_position_and_logs(gateway: httpx.AsyncClient, fake: FakeFal) -> None:
    secret = "sk-" + "a" * 40
    logs = [{"message": f"step {i}", "level": "INFO", "source": "USER", "timestamp": "t"} for i in range(8)]
    logs.append({"message": f"loaded weights with key {secret}", "level": "INFO", "source": "USER", "timestamp": "t"})
    fake.scenario = FalScenario(queue_polls=30, progress_polls=15, logs=logs)  # ~1 s queued, ~0.5 s running
    events = await read_events(gateway, await submit(gateway))
    assert events[-1][0] == "succeeded" and "progress" not in events[-1][1]
    reports = [data["progress"] for name, data in events if name == "in_progress" and "progress" in data]
    queued = [r for r in reports if r["status"] == "IN_QUEUE"]
    assert queued and all(isinstance(r["queue_position"], int) for r in queued), reports
    positions = [r["queue_position"] for r in queued]
    assert len(set(positions)) >= 2 and positions == sorted(positions, reverse=True), positions
    running = [r for r in reports if r["status"] == "IN_PROGRESS"]
    assert running and running[-1]["queue_position"] is None
    last_logs = running[-1]["logs"]
    assert len(last_logs) == 5
    assert last_logs[:4] == ["step 4", "step 5", "step 6", "step 7"] and "loaded weights" in last_logs[4]
    assert secret not in json.dumps(events)
