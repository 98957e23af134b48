"""The Redis engine through the real app against fake fal servers on 127.0.0.1:

- drain: 1,000 async jobs against a fal whose model takes 0.2 s, `max_concurrent_jobs: 8` ->
  exactly 1,000 submits, never more than 8 jobs in flight upstream (counted on the fake, from the
  submit to the fetch of the result), all within a minute, and nothing left in the streams;
- a worker that dies mid-job (its heartbeat stops, nothing is released): after the visibility
  timeout another gateway's worker takes the job's stream entry over (XAUTOCLAIM) and resumes
  the same upstream job: one submit on the fake, never a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from tests.conftest import gateway_settings
from tests.fakes.fal import FakeFal, FalScenario
from tests.fakes.lean_fal import LeanFal
from tests.fakes.server import LocalServer
from tests.redis_support import redis_prefix, redis_url

from imagegate.app import create_app
from imagegate.jobs.redis_store import RedisJobStore

__all__ = ["redis_prefix", "redis_url"]

ASYNC = {"prefer": "respond-async"}
JOBS = 1000
MODEL_SECONDS = 0.2
LIMIT = 8


class CountingFal(LeanFal):
    """The lean fake fal, counting the jobs in flight: from an accepted submit to the first
    fetch of its finished result."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.in_flight = self.peak = 0
        self._fetched: set[str] = set()

    def answer(self, method: str, path: str, auth: bytes | None, body: bytes) -> tuple[int, bytes, bytes]:
        status, ctype, payload = super().answer(method, path, auth, body)
        parts = path.split("?", 1)[0].strip("/").split("/")
        if method == "POST" and status == 200 and len(parts) >= 2 and "requests" not in parts:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        elif method == "GET" and status == 200 and len(parts) == 4 and parts[2] == "requests" \
                and parts[3] not in self._fetched:
            self._fetched.add(parts[3])
            self.in_flight -= 1
        return status, ctype, payload


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


async def streams_left(store: RedisJobStore, lane: str = "fal") -> tuple[int, int, int]:
    """(pending entries, entries, bound entries) of the lane's stream."""
    key = store._p + "stream:" + lane
    pending = (await store._redis.xpending(key, "workers"))["pending"]
    return int(pending), int(await store._redis.xlen(key)), int(await store._redis.hlen(store._p + "bound"))


async def test_drain_1000_jobs_with_8_in_flight(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    fake = CountingFal(key="test-fal-key", model_seconds=MODEL_SECONDS)
    fal_url = await fake.start()
    settings = gateway_settings(
        tmp_path,
        delivery={"url_mode": "passthrough"},
        providers={"fal": {"key": "test-fal-key", "queue_url": fal_url, "run_url": fal_url, "rest_url": fal_url,
                           "poll_interval": 0.02, "poll_max_interval": 0.05, "max_concurrent_jobs": LIMIT}},
        redis={"url": redis_url, "key_prefix": redis_prefix},
        jobs={"workers": 16, "poll_seconds": 30},  # only the streams can keep the workers busy
    )
    app = create_app(settings)
    body = {"model": "qwen-image", "prompt": "a lighthouse", "response_format": "url"}
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30
        ) as client:
            store = app.state.jobs.store
            assert isinstance(store, RedisJobStore)
            rss_before = rss_mb()
            started = time.monotonic()
            gate = asyncio.Semaphore(32)

            async def submit() -> str:
                async with gate:
                    response = await client.post("/v1/images/generations", json=body, headers=ASYNC)
                assert response.status_code == 202, response.text
                return str(response.json()["id"])

            ids = await asyncio.gather(*(submit() for _ in range(JOBS)))
            while (counts := await store.counts()).get("succeeded", 0) + counts.get("failed", 0) < JOBS:
                assert time.monotonic() - started < 60, (counts, fake.stats.as_dict())
                await asyncio.sleep(0.1)
            elapsed = time.monotonic() - started
            assert counts == {"succeeded": JOBS}, counts
            assert await streams_left(store) == (0, 0, 0)
            sample = (await client.get(f"/v1/images/jobs/{ids[-1]}")).json()
            assert sample["status"] == "succeeded" and sample["result"]["data"][0]["url"].startswith(fal_url)
            assert rss_mb() - rss_before < 200  # job records and results live in Redis, not here
    finally:
        await fake.close()
    assert fake.stats.submits == JOBS and fake.stats.cancels == 0
    assert len(fake._fetched) == JOBS and fake.in_flight == 0
    assert LIMIT - 2 <= fake.peak <= LIMIT, fake.peak
    assert JOBS * MODEL_SECONDS / LIMIT <= elapsed < 60, elapsed  # never faster than 8 at a time allows


@pytest.fixture
def fal() -> Iterator[tuple[FakeFal, LocalServer]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv


def gateway(tmp_path: Path, srv: LocalServer, url: str, prefix: str, name: str) -> FastAPI:
    settings = gateway_settings(
        tmp_path / name,
        providers={"fal": {"key": "test-fal-key", "queue_url": srv.url, "run_url": srv.url + "/sync",
                           "rest_url": srv.url, "poll_interval": 0.05, "poll_max_interval": 0.1}},
        redis={"url": url, "key_prefix": prefix},
        jobs={"workers": 1, "lease_seconds": 1.0, "poll_seconds": 30},
    )
    return create_app(settings)


async def test_a_dead_workers_job_is_reclaimed_and_resumed(
    tmp_path: Path, fal: tuple[FakeFal, LocalServer], redis_url: str, redis_prefix: str
) -> None:
    fake, srv = fal
    fake.scenario = FalScenario(queue_polls=0, progress_polls=20)  # about 1-2 s of polling
    apps = [gateway(tmp_path, srv, redis_url, redis_prefix, name) for name in ("a", "b")]
    async with apps[0].router.lifespan_context(apps[0]), apps[1].router.lifespan_context(apps[1]):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=apps[0]), base_url="http://gateway")
        async with client:
            response = await client.post(
                "/v1/images/generations", json={"model": "qwen-image", "prompt": "p", "size": "512x512"},
                headers=ASYNC,
            )
            job_id = response.json()["id"]
            store = apps[0].state.jobs.store
            for _ in range(200):
                held = await store.get(job_id)
                if held is not None and held.upstream_request_id is not None:
                    break
                await asyncio.sleep(0.02)
            assert held is not None and held.upstream_request_id == fake.submits[0].request_id
            runners = {app.state.jobs.runner.owner: app.state.jobs.runner for app in apps}
            dead = runners.pop(held.lease_owner or "")
            alive = next(iter(runners.values()))
            lane, entry = (v.decode() for v in await store._redis.hmget(store._p + "job:" + job_id, "lane", "entry"))
            # the holder dies: its tasks stop without releasing anything or touching the upstream job
            dead._stopping = True
            for task in dead._tasks:
                task.cancel()
            await asyncio.gather(*dead._tasks, return_exceptions=True)
            died = time.monotonic()
            pending = await store._redis.xpending_range(store._p + "stream:" + lane, "workers", "-", "+", 10)
            assert [(p["message_id"].decode(), p["consumer"].decode()) for p in pending] == [(entry, dead.owner)]
            taken = None
            while taken is None or taken.lease_owner != alive.owner:
                assert time.monotonic() - died < 5
                await asyncio.sleep(0.02)
                taken = await store.get(job_id)
            reclaimed_after = time.monotonic() - died
            pending = await store._redis.xpending_range(store._p + "stream:" + lane, "workers", "-", "+", 10)
            assert [(p["message_id"].decode(), p["consumer"].decode()) for p in pending] == [(entry, alive.owner)]
            while (done := await store.get(job_id)) is not None and not done.terminal:
                await asyncio.sleep(0.05)
    assert 0.5 <= reclaimed_after < 2.5, reclaimed_after  # after the 1 s visibility timeout, not a 30 s poll
    assert done is not None and done.status == "succeeded" and done.attempts == 2, done
    assert len(fake.submits) == 1 and fake.cancels == [] and not fake.rejected_submits
    assert done.upstream_request_id == fake.submits[0].request_id
