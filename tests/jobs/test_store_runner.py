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
    lane, entry = await store._redis.hmget(store._p + "job:" + job_id, ["lane", "entry"])
    await store._redis.xclaim(store._p + "stream:" + lane.decode(), "workers", owner, 0, [entry], justid=True)
    await store._redis.hset(store._p + "job:" + job_id, mapping={"lease_owner": owner, "lease_until": until})


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
    # every worker uses one visibility timeout (jobs.lease_seconds): "alive" reclaims after 0.2 s too
    assert await store.claim("alive", lease=0.2, exclude_lanes=[]) is None  # still leased
    await asyncio.sleep(0.3)
    again = await store.claim("alive", lease=0.2, exclude_lanes=[])
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


async def test_requeue_backoff_cancel_release_and_listing(store: JobStore) -> None:
    """The rest of the JobStore contract, the same on both engines."""
    for n in range(3):
        await store.add(job(f"imgjob_r{n}", "a"), {"prompt": f"p{n}"})
    await store.add(job("imgjob_other", "b"), {})
    taken = await store.claim("w1", lease=30, exclude_lanes=[])
    assert taken is not None and taken.id == "imgjob_r0"
    assert await store.requeue("imgjob_r0", "w2", not_before=0, error={}) is False  # not the owner
    error = {"message": "busy", "type": "server_error", "code": "upstream_unavailable"}
    assert await store.requeue("imgjob_r0", "w1", not_before=time.time() + 0.4, error=error) is True
    back = await store.get("imgjob_r0")
    assert back is not None and back.status == "queued" and back.error == error and back.queue_position == 0
    # r0 waits out its backoff: r1 (older, and key a runs nothing now), then b's job (a runs one)
    claimed = [await store.claim("w1", lease=30, exclude_lanes=[]) for _ in range(2)]
    assert [j.id for j in claimed if j] == ["imgjob_r1", "imgjob_other"]
    assert await store.cancel_queued("imgjob_r2") is True and await store.cancel_queued("imgjob_r1") is False
    assert await store.request_of("imgjob_r2") is None and await store.request_of("imgjob_r1") == {"prompt": "p1"}
    assert await store.claim("w1", lease=30, exclude_lanes=[]) is None  # r0 not due yet
    await asyncio.sleep(0.45)
    again = await store.claim("w1", lease=30, exclude_lanes=[])
    assert again is not None and again.id == "imgjob_r0" and again.attempts == 2
    assert await store.counts() == {"in_progress": 3, "canceled": 1}
    # a stopping process releases its leases: another worker takes them at once
    assert await store.release("w1") == 3
    assert await store.renew("imgjob_r1", "w1", lease=30) is False  # still ours until someone claims it
    taken = await store.claim("w9", lease=30, exclude_lanes=[])
    assert taken is not None and taken.lease_owner == "w9" and taken.id in ("imgjob_r0", "imgjob_other")
    await store.request_cancel(taken.id)
    assert await store.renew(taken.id, "w9", lease=30) is True  # the cancel arrives with the renewal
    done = await store.get("imgjob_r1")
    assert done is not None
    done.status, done.result = "succeeded", {"created": 1, "data": []}
    assert await store.finish(done, "w9") is False  # w9 does not hold it
    assert await store.finish(done, "w1") is True and await store.finish(done, "w1") is False
    page = await store.page("a", limit=2, after=None, status=None)
    assert [j.id for j in page] == ["imgjob_r2", "imgjob_r1"]
    assert [j.id for j in await store.page("a", limit=5, after="imgjob_r1", status=None)] == ["imgjob_r0"]
    assert [j.id for j in await store.page("a", limit=5, after=None, status="succeeded")] == ["imgjob_r1"]
    assert await store.page("a", limit=5, after="imgjob_other", status=None) == []  # another key's job
    assert await store.purge(time.time() + 1) == 2  # the finished ones
    assert await store.get("imgjob_r1") is None and await store.get("imgjob_r0") is not None


async def test_idempotency_key_and_webhooks_due(store: JobStore) -> None:
    first = job("imgjob_i1", "a")
    first.idempotency_key = "k1"
    assert (await store.add(first, {})).id == "imgjob_i1"
    second = job("imgjob_i2", "a")
    second.idempotency_key = "k1"
    assert (await store.add(second, {})).id == "imgjob_i1"  # the same key's job, nothing stored
    assert await store.get("imgjob_i2") is None
    other = job("imgjob_i3", "b")
    other.idempotency_key = "k1"
    assert (await store.add(other, {})).id == "imgjob_i3"  # another client key: its own job
    done = await store.get("imgjob_i1")
    assert done is not None
    done.status, done.webhook = "failed", {"id": "msg_x", "status": "pending", "attempts": [], "next_at": 1.0}
    assert await store.finish(done, None) is True  # still queued: finished without an owner
    due = await store.due_webhooks(time.time(), 10, hold=60)
    assert [j.id for j in due] == ["imgjob_i1"] and due[0].webhook is not None and due[0].webhook["attempts"] == []
    assert await store.due_webhooks(time.time(), 10, hold=60) == []  # taken for `hold` seconds
    assert await store.purge(time.time() + 1) == 0  # a pending webhook keeps the job
    await store.save_webhook("imgjob_i1", {"id": "msg_x", "status": "delivered", "attempts": [{"status": 200}]}, None)
    assert await store.purge(time.time() + 1) == 1


async def test_cancel_of_a_job_whose_worker_died_in_an_unresumable_call_is_canceled(store: JobStore) -> None:
    """The dead worker left only the record of a call without a handle (nothing to follow upstream):
    a cancel requested meanwhile makes the job `canceled`, and the call is not made again."""
    await store.add(job("imgjob_u", "a"), {"prompt": "p"})
    taken = await store.claim("dead", lease=0.2, exclude_lanes=[])
    assert taken is not None
    await store.save_handle("imgjob_u", "openai:m:abc#0", {"request_id": None, "unresumable": True}, None)
    await store.request_cancel("imgjob_u")
    calls: list[str] = []

    async def execute(job: Job, _: UpstreamHooks) -> Outcome:
        calls.append(job.id)
        return {}, {}

    runner = JobRunner(store, execute, JobsSettings(workers=1, lease_seconds=0.2, poll_seconds=0.05), lane_limits={})
    await asyncio.sleep(0.3)  # the dead worker's lease runs out
    runner.start()
    try:
        for _ in range(150):
            done = await store.get("imgjob_u")
            if done is not None and done.status != "in_progress" and done.status != "queued":
                break
            await asyncio.sleep(0.02)
        assert done is not None and done.status == "canceled", done
        assert calls == []
    finally:
        await runner.stop()
