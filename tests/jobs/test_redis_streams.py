"""The Redis engine's delivery through Redis Streams consumer groups, with the runner and a real
Redis (own key prefix): an idle worker blocked in XREADGROUP takes a job added by another client
(another process) at once, whatever `jobs.poll_seconds` says; fairness across keys; a backed-off
job is promoted when due, not at the next poll; finished jobs leave nothing pending in the streams;
Redis going away is a clean `StateUnavailable`, also in the middle of a blocked read."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis
from tests.redis_support import redis_prefix, redis_url
from tests.tcp_proxy import TcpProxy

from imagegate.core.errors import ProviderUnavailable
from imagegate.jobs.model import Job
from imagegate.jobs.redis_store import RedisJobStore
from imagegate.jobs.runner import JobRunner, Outcome
from imagegate.providers.resume import UpstreamHooks
from imagegate.settings import JobsSettings
from imagegate.state.redis import StateUnavailable

__all__ = ["redis_prefix", "redis_url"]

DONE: Outcome = ({"created": 1, "data": []}, {})


@pytest.fixture
async def stores(redis_url: str, redis_prefix: str) -> AsyncIterator[tuple[RedisJobStore, RedisJobStore]]:
    """(the workers' store, an API process's store): two clients, as two processes would have."""
    workers = Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    api = Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    yield RedisJobStore(workers, redis_prefix, lanes=["fal", "replicate"]), RedisJobStore(api, redis_prefix)
    await workers.aclose()
    await api.aclose()


def job(job_id: str, key: str, lane: str = "fal") -> Job:
    return Job(id=job_id, key=key, model="m", operation="generate", lane=lane, base_url="http://gw",
               created_at=time.time())


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


async def streams_state(store: RedisJobStore, lanes: tuple[str, ...] = ("fal", "replicate")) -> dict[str, Any]:
    """What the lanes' streams hold: pending entries, entries at all, bound entries, running per key."""
    redis, p = store._redis, store._p
    pending = {lane: (await redis.xpending(p + "stream:" + lane, "workers"))["pending"] for lane in lanes}
    length = {lane: await redis.xlen(p + "stream:" + lane) for lane in lanes}
    running = {k.decode(): int(v) for k, v in (await redis.hgetall(p + "running")).items() if int(v)}
    return {"pending": pending, "length": length, "bound": await redis.hlen(p + "bound"), "running": running}


def runner(store: RedisJobStore, execute: Any, **settings: Any) -> JobRunner:
    values: dict[str, Any] = {"workers": 2, "poll_seconds": 30.0, **settings}
    return JobRunner(store, execute, JobsSettings(**values), lane_limits={"fal": 2, "replicate": 1})


async def test_an_idle_worker_takes_a_new_job_at_once(stores: tuple[RedisJobStore, RedisJobStore]) -> None:
    """poll_seconds is 30 s and the job is added through another client (no in-process wake-up):
    only the blocked XREADGROUP can hand it over this fast."""
    workers, api = stores
    started: dict[str, float] = {}

    async def execute(job: Job, _: UpstreamHooks) -> Outcome:
        started[job.id] = time.monotonic()
        return DONE

    jobs = runner(workers, execute)
    jobs.start()
    try:
        delays = []
        for n in range(6):
            await asyncio.sleep(0.25)  # idle: blocked in XREADGROUP
            added = time.monotonic()
            await api.add(job(f"imgjob_l{n}", "a", lane=("fal", "replicate")[n % 2]), {})
            await until(lambda n=n: f"imgjob_l{n}" in started, 5)
            delays.append(started[f"imgjob_l{n}"] - added)
        consumers = await workers._redis.xinfo_consumers(workers._p + "stream:fal", "workers")
        assert [c["name"].decode() for c in consumers] == [jobs.owner]  # the runner is the group's consumer
    finally:
        await jobs.stop()
    # measured ~6 ms median, ~70 ms worst at load average 8 on 2 cores; the old engine polled (0.5 s by default)
    assert sorted(delays)[len(delays) // 2] < 0.05 and max(delays) < 0.2, delays


async def test_one_key_cannot_starve_another(stores: tuple[RedisJobStore, RedisJobStore]) -> None:
    workers, api = stores
    for n in range(300):
        await api.add(job(f"imgjob_bulk{n:03}", "bulk"), {})
    for n in range(3):
        await api.add(job(f"imgjob_small{n}", "small"), {})
    order: list[str] = []

    async def execute(job: Job, _: UpstreamHooks) -> Outcome:
        order.append(job.id)
        await asyncio.sleep(0.01)
        return DONE

    jobs = runner(workers, execute)
    jobs.start()
    try:
        await until(lambda: len(order) >= 12)
    finally:
        await jobs.stop()
    small = [order.index(f"imgjob_small{n}") for n in range(3)]
    assert small == sorted(small) and small[-1] < 8, order[:12]  # not after the 300 bulk jobs
    bulk = [name for name in order if "bulk" in name]
    assert bulk == sorted(bulk) and bulk[0] == "imgjob_bulk000"  # each key's jobs in submit order


async def test_a_backed_off_job_is_promoted_when_due(stores: tuple[RedisJobStore, RedisJobStore]) -> None:
    workers, api = stores
    runs: list[float] = []

    async def execute(job: Job, _: UpstreamHooks) -> Outcome:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise ProviderUnavailable("fal is down")
        return DONE

    jobs = runner(workers, execute, workers=1, backoff_base=0.4, backoff_max=0.4)
    jobs.start()
    try:
        await api.add(job("imgjob_d", "a"), {})
        await until(lambda: len(runs) == 2, 5)
        for _ in range(100):
            done = await api.get("imgjob_d")
            if done is not None and done.status == "succeeded":
                break
            await asyncio.sleep(0.02)
    finally:
        await jobs.stop()
    assert done is not None and done.status == "succeeded" and done.attempts == 2
    assert 0.25 <= runs[1] - runs[0] < 0.9, runs  # backoff 0.3-0.4 s: promoted when due, not at the 30 s poll


async def test_finished_jobs_leave_nothing_pending(stores: tuple[RedisJobStore, RedisJobStore]) -> None:
    """Succeeded, failed-then-requeued, canceled-while-queued: afterwards no entry is pending, no
    ticket is left in the streams, nothing is bound and no key counts as running."""
    workers, api = stores
    failed_once: set[str] = set()
    gate = asyncio.Event()

    async def execute(job: Job, _: UpstreamHooks) -> Outcome:
        await gate.wait()
        if job.id.endswith("7") and job.id not in failed_once:
            failed_once.add(job.id)
            raise ProviderUnavailable("fal is down")
        return DONE

    ids = [f"imgjob_p{n:02}" for n in range(30)]
    for n, job_id in enumerate(ids):
        await api.add(job(job_id, f"k{n % 3}", lane=("fal", "replicate")[n % 2]), {})
    jobs = runner(workers, execute, workers=4, backoff_base=0.1, backoff_max=0.1)
    jobs.start()
    try:
        canceled = ids[20:25]
        for job_id in canceled:  # their tickets stay in the streams, stale
            assert await api.cancel_queued(job_id)
        for _ in range(100):  # the lanes fill up: fal 2, replicate 1, one worker left idle
            running = await streams_state(workers)
            if running["pending"] == {"fal": 2, "replicate": 1}:
                break
            await asyncio.sleep(0.02)
        assert running["pending"] == {"fal": 2, "replicate": 1} and running["bound"] == 3, running
        gate.set()

        async def all_done() -> bool:
            found = [await api.get(job_id) for job_id in ids]
            return all(j is not None and j.terminal for j in found)

        deadline = time.monotonic() + 20
        while not await all_done():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        state = await streams_state(workers)
    finally:
        await jobs.stop()
    assert failed_once and await api.counts() == {"succeeded": 25, "canceled": 5}
    assert state == {"pending": {"fal": 0, "replicate": 0}, "length": {"fal": 0, "replicate": 0}, "bound": 0,
                     "running": {}}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_redis_down_is_state_unavailable(redis_prefix: str) -> None:
    client = Redis.from_url(f"redis://127.0.0.1:{closed_port()}/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    store = RedisJobStore(client, redis_prefix, lanes=["fal"])
    started = time.monotonic()
    with pytest.raises(StateUnavailable):
        await store.claim("w1", lease=30, exclude_lanes=[], block=2.0)
    with pytest.raises(StateUnavailable):
        await store.unblock("w1")
    with pytest.raises(StateUnavailable):
        await store.renew("imgjob_x", "w1", lease=30)
    assert time.monotonic() - started < 3
    await client.aclose()


async def test_redis_lost_during_a_blocked_read(redis_url: str, redis_prefix: str) -> None:
    target = urlsplit(redis_url)
    with TcpProxy(target.port or 6379, target.hostname or "127.0.0.1") as proxy:
        client = Redis.from_url(f"redis://127.0.0.1:{proxy.port}{target.path or '/0'}", socket_timeout=0.5,
                                socket_connect_timeout=0.5)
        store = RedisJobStore(client, redis_prefix, lanes=["fal"])
        try:
            claim = asyncio.ensure_future(store.claim("w1", lease=30, exclude_lanes=[], block=4.0))
            await asyncio.sleep(0.3)
            assert not claim.done()  # blocked in XREADGROUP
            cut = time.monotonic()
            proxy.mode = "down"
            with pytest.raises(StateUnavailable):
                await claim
            assert time.monotonic() - cut < 1.5
            proxy.mode = "blackhole"
            started = time.monotonic()
            with pytest.raises(StateUnavailable):
                await store.claim("w1", lease=30, exclude_lanes=[], block=1.0)
            assert time.monotonic() - started < 4  # bounded by the command timeout, never a hang
            proxy.mode = "up"
            await store.add(job("imgjob_back", "a"), {})
            back = await store.claim("w1", lease=30, exclude_lanes=[], block=1.0)
            assert back is not None and back.id == "imgjob_back"
        finally:
            proxy.mode = "up"
            await client.aclose()


async def test_jobs_from_before_the_streams_are_delivered(stores: tuple[RedisJobStore, RedisJobStore]) -> None:
    """Upgrading: a queued job waiting in its ready set and a running one under the old `leases`
    sorted set, with no streams yet, are both delivered (the running one with its handles)."""
    workers, api = stores
    redis, p = api._redis, api._p
    for seq, (job_id, status) in enumerate((("imgjob_old_q", "queued"), ("imgjob_old_r", "in_progress")), 1):
        await redis.hset(p + "job:" + job_id, mapping={
            "id": job_id, "key": "a", "model": "m", "operation": "generate", "lane": "fal", "base_url": "http://gw",
            "created_at": repr(time.time()), "status": status, "seq": seq, "attempts": seq - 1,
        })
    await redis.zadd(p + "ready:fal:a", {"imgjob_old_q": 1})
    await redis.zadd(p + "queued", {"imgjob_old_q": 1})
    await redis.sadd(p + "readykeys:fal", "a")
    await redis.sadd(p + "lanes", "fal")
    await redis.hset(p + "job:imgjob_old_r", mapping={"lease_owner": "gone", "lease_until": "1.0"})
    await redis.zadd(p + "leases", {"imgjob_old_r": 1.0})
    await redis.hset(p + "handles:imgjob_old_r", "fal:m:x#0", '{"request_id": "up-1", "provider": "fal"}')
    await redis.hset(p + "running", "a", 1)
    await redis.hset(p + "counts", mapping={"queued": 1, "in_progress": 1})
    taken = [await workers.claim("w1", lease=30, exclude_lanes=[], block=1.0) for _ in range(2)]
    assert sorted(j.id for j in taken if j) == ["imgjob_old_q", "imgjob_old_r"]
    resumed = next(j for j in taken if j and j.id == "imgjob_old_r")
    assert resumed.handles == {"fal:m:x#0": {"request_id": "up-1", "provider": "fal"}} and resumed.attempts == 2
    assert await workers.claim("w1", lease=30, exclude_lanes=[], block=0.2) is None  # no ticket twice
    state = await streams_state(workers)
    assert state["pending"]["fal"] == 2 and state["bound"] == 2 and state["running"] == {"a": 2}
    assert await api.counts() == {"in_progress": 2} and not await redis.exists(p + "leases")


class SwallowingStore(RedisJobStore):
    """A slow lease renewal that loses a cancel (seen inside the Redis client under load)."""

    async def renew(self, job_id: str, owner: str, *, lease: float) -> bool | None:
        try:
            await asyncio.sleep(0.3)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        return await super().renew(job_id, owner, lease=lease)


async def test_a_lost_heartbeat_cancel_does_not_keep_a_job_running(redis_url: str, redis_prefix: str) -> None:
    client = Redis.from_url(redis_url, socket_timeout=2)
    store = SwallowingStore(client, redis_prefix, lanes=["fal"])

    async def execute(job: Job, _: UpstreamHooks) -> Outcome:
        await asyncio.sleep(0.6)  # ends while the heartbeat (every 0.1 s) is inside its slow renewal
        return DONE

    jobs = JobRunner(store, execute, JobsSettings(workers=1, lease_seconds=0.3, poll_seconds=30), lane_limits={})
    jobs.start()
    try:
        await store.add(job("imgjob_h", "a"), {})
        for _ in range(150):
            done = await store.get("imgjob_h")
            if done is not None and done.terminal:
                break
            await asyncio.sleep(0.02)
    finally:
        await jobs.stop()
        await client.aclose()
    assert done is not None and done.status == "succeeded", done
