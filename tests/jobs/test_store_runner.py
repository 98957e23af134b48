"""The job stores (SQLite and Redis, the same tests on both) and the runner, without HTTP: fair
claims per key, full lanes skipped, expired leases reclaimed, a worker that lost its lease lets go
without touching the upstream job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from tests.redis_support import redis_prefix, redis_url

from imagegate.jobs.model import Job
from imagegate.jobs.redis_store import RedisJobStore
from imagegate.jobs.runner import JobRunner, Outcome
from imagegate.jobs.store import JobStore, SqliteJobStore
from imagegate.providers.resume import UpstreamHooks
from imagegate.settings import JobsSettings

__all__ = ["redis_prefix", "redis_url"]


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    if request.param == "sqlite":
        sqlite = SqliteJobStore(tmp_path / "jobs.db")
        yield sqlite
        await sqlite.close()
        return
    prefix = request.getfixturevalue("redis_prefix")
    client = Redis.from_url(request.getfixturevalue("redis_url"))
    yield RedisJobStore(client, prefix)
    await client.aclose()


async def steal(store: JobStore, job_id: str, owner: str, until: float) -> None:
    """Another worker takes the job (as if it had reclaimed it)."""
    if isinstance(store, SqliteJobStore):
        def write(db: Any) -> None:
            db.execute("UPDATE jobs SET lease_owner = ?, lease_until = ? WHERE id = ?", (owner, until, job_id))

        await store._run(write)
        return
    assert isinstance(store, RedisJobStore)
    await store._redis.hset(store._p + "job:" + job_id, mapping={"lease_owner": owner, "lease_until": until})
    await store._redis.zadd(store._p + "leases", {job_id: until})


def job(job_id: str, key: str, lane: str = "fal") -> Job:
    return Job(id=job_id, key=key, model="m", operation="generate", lane=lane, base_url="http://gw",
               created_at=time.time())


async def test_claims_are_fair_per_key_and_skip_full_lanes(store: JobStore) -> None:
    for n in range(4):
        await store.add(job(f"imgjob_a{n}", "a"), {})
    await store.add(job("imgjob_b0", "b"), {})
    await store.add(job("imgjob_c0", "c", lane="replicate"), {})
    first = await store.claim("w1", lease=30, exclude_lanes=[])
    second = await store.claim("w1", lease=30, exclude_lanes=[])
    third = await store.claim("w1", lease=30, exclude_lanes=["replicate"])
    assert [j.id if j else None for j in (first, second, third)] == ["imgjob_a0", "imgjob_b0", "imgjob_a1"]
    assert (await store.claim("w1", lease=30, exclude_lanes=["fal"])).id == "imgjob_c0"  # type: ignore[union-attr]
    assert await store.claim("w1", lease=30, exclude_lanes=["fal", "replicate"]) is None
    queued = await store.get("imgjob_a3")
    assert queued is not None and queued.status == "queued" and queued.queue_position == 1


async def test_expired_lease_is_reclaimed_with_its_handles(store: JobStore) -> None:
    await store.add(job("imgjob_x", "a"), {"prompt": "p"})
    taken = await store.claim("dead", lease=0.2, exclude_lanes=[])
    assert taken is not None and taken.attempts == 1
    await store.save_handle("imgjob_x", "fal:m:abc#0", {"request_id": "up-1", "provider": "fal"}, "up-1")
    assert await store.claim("alive", lease=30, exclude_lanes=[]) is None  # still leased
    await asyncio.sleep(0.3)
    again = await store.claim("alive", lease=30, exclude_lanes=[])
    assert again is not None and again.attempts == 2 and again.upstream_request_id == "up-1"
    assert again.handles == {"fal:m:abc#0": {"request_id": "up-1", "provider": "fal"}}
    assert await store.renew("imgjob_x", "dead", lease=30) is None  # the dead worker's lease is gone


async def test_a_worker_that_lost_its_lease_lets_go(store: JobStore) -> None:
    seen: list[UpstreamHooks] = []
    cancelled = asyncio.Event()

    async def execute(_: Job, hooks: UpstreamHooks) -> Outcome:
        seen.append(hooks)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}, {}

    settings = JobsSettings(workers=1, lease_seconds=0.3, poll_seconds=0.05)
    runner = JobRunner(store, execute, settings, lane_limits={})
    await store.add(job("imgjob_y", "a"), {})
    runner.start()
    try:
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        await steal(store, "imgjob_y", "other", time.time() + 60)
        await asyncio.wait_for(cancelled.wait(), 5)
        assert seen[0].detached  # the adapter leaves the upstream job to the new owner
        await asyncio.sleep(0.2)
        stolen = await store.get("imgjob_y")
        assert stolen is not None and stolen.status == "in_progress" and stolen.lease_owner == "other"
    finally:
        await runner.stop()
