"""Reclaiming on the Redis engine under adverse conditions, with a real Redis (own key prefix):
a dead worker's entry behind more than a thousand live running entries of the same lane is still
reclaimed, and a claim stays cheap with that many jobs running; a worker that stalled past its
lease (a paused process) and comes back never submits the job the worker that reclaimed it has
submitted meanwhile, nor finishes it over that worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from tests.redis_support import redis_prefix, redis_url

from imagegate.jobs.model import Job
from imagegate.jobs.redis_store import RedisJobStore
from imagegate.jobs.runner import JobRunner, Outcome
from imagegate.providers.resume import UpstreamHooks
from imagegate.settings import JobsSettings

__all__ = ["redis_prefix", "redis_url"]



@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
    yield redis
    await redis.aclose()


def job(job_id: str, key: str = "a") -> Job:
    return Job(id=job_id, key=key, model="m", operation="generate", lane="fal", base_url="http://gw",
               created_at=time.time())


async def test_a_dead_entry_behind_a_thousand_live_ones_is_reclaimed(client: Redis, redis_prefix: str) -> None:
    """More jobs run in a lane than one claim used to scan (1,000 pending entries): a dead
    worker's entry after them is still reclaimed, by the first claim."""
    store = RedisJobStore(client, redis_prefix, lanes=["fal"])
    live, lease = 1100, 4.0
    for n in range(live):
        await store.add(job(f"imgjob_live{n:04}"), {})
    await store.add(job("imgjob_dead"), {})
    for n in range(live):
        taken = await store.claim("live", lease=lease, exclude_lanes=())
        assert taken is not None and taken.id == f"imgjob_live{n:04}", (n, taken)
    dead = await store.claim("dead", lease=lease, exclude_lanes=())
    assert dead is not None and dead.id == "imgjob_dead"
    await asyncio.sleep(lease + 0.1)  # the dead worker's entry is idle past the lease; the live one renews its own
    renewed: list[bool | None] = []
    for first in range(0, live, 50):
        batch = range(first, min(live, first + 50))
        renewed += await asyncio.gather(*(store.renew(f"imgjob_live{n:04}", "live", lease=lease) for n in batch))
    assert renewed == [False] * live
    found = await store.claim("other", lease=lease, exclude_lanes=())
    assert found is not None and found.id == "imgjob_dead"
    assert found.lease_owner == "other" and found.attempts == 2


async def test_a_worker_back_from_a_pause_does_not_submit_a_reclaimed_job(client: Redis, redis_prefix: str) -> None:
    """Worker A claims the job and stalls before submitting (its process paused: no heartbeat)
    longer than the lease; worker B reclaims the job and submits it. A comes back: it must not
    submit the job again, nor finish it over B."""
    stalled, second = RedisJobStore(client, redis_prefix, lanes=["fal"]), RedisJobStore(client, redis_prefix)
    await second.add(job("imgjob_p"), {})
    submits: list[str] = []
    paused = asyncio.Event()
    resume = asyncio.Event()

    def executor(name: str, pause: bool) -> Any:
        async def execute(job: Job, hooks: UpstreamHooks) -> Outcome:
            if pause:
                paused.set()
                await resume.wait()
            async with hooks.call("fal", "m", {"prompt": "p"}) as call:
                if call.handle is None:
                    submits.append(name)
                    await call.accepted({"request_id": f"req-{name}"})
            return ({"created": 1, "data": [], "by": name}, {})
        return execute

    settings = JobsSettings(workers=1, poll_seconds=30.0, lease_seconds=0.6)
    a = JobRunner(stalled, executor("a", True), settings, lane_limits={"fal": 1})
    frozen = asyncio.Event()

    async def frozen_renew(*_: Any, **__: Any) -> bool | None:
        await frozen.wait()  # the paused process renews nothing
        return None

    stalled.renew = frozen_renew  # type: ignore[method-assign]
    a.start()
    b: JobRunner | None = None
    try:
        await asyncio.wait_for(paused.wait(), 5)
        b = JobRunner(second, executor("b", False), settings, lane_limits={"fal": 1})
        b.start()
        deadline = time.monotonic() + 10
        while (await second.get("imgjob_p")).status != "succeeded":  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # the process runs again; its heartbeat's renew is still on its way (it stays blocked here)
        stalled.renew = second.renew  # type: ignore[method-assign]
        resume.set()
        await asyncio.sleep(0.5)
    finally:
        frozen.set()
        await a.stop()
        if b is not None:
            await b.stop()
    assert submits == ["b"]
    final = await second.get("imgjob_p")
    assert final is not None and final.result == {"created": 1, "data": [], "by": "b"}


async def test_a_ticket_read_by_a_worker_that_died_before_binding_it_is_not_lost(
    client: Redis, redis_prefix: str
) -> None:
    """A worker's blocked XREADGROUP delivered the job's only ticket, and the worker died before
    the script that binds it ran: after the lease another worker takes the job (once)."""
    store = RedisJobStore(client, redis_prefix, lanes=["fal"])
    assert await store.claim("dead", lease=0.5, exclude_lanes=(), block=0.01) is None  # streams and groups exist
    await store.add(job("imgjob_t"), {})
    wake, tickets = await store._read("dead", ["fal"], 1.0)  # delivered; no BIND follows
    assert wake == [] and len(tickets) == 1
    assert await store.claim("live", lease=0.5, exclude_lanes=()) is None  # the ticket is the dead worker's
    await asyncio.sleep(0.6)
    taken = await store.claim("live", lease=0.5, exclude_lanes=())
    assert taken is not None and taken.id == "imgjob_t" and taken.attempts == 1 and taken.lease_owner == "live"
    assert await store.claim("third", lease=0.5, exclude_lanes=()) is None


async def test_a_submit_accepted_after_the_lease_was_lost_does_not_replace_the_new_owners_handle(
    client: Redis, redis_prefix: str
) -> None:
    """Worker A's process pauses while its submit is on the wire; B reclaims the job and submits
    it. A's upstream answer arrives late: A's handle is not recorded over B's (a later resume
    follows B's upstream job) and A stops, without finishing the job."""
    stalled, second = RedisJobStore(client, redis_prefix, lanes=["fal"]), RedisJobStore(client, redis_prefix)
    await second.add(job("imgjob_w"), {})
    on_the_wire, answer = asyncio.Event(), asyncio.Event()
    ended: list[str] = []

    def executor(name: str) -> Any:
        async def execute(job: Job, hooks: UpstreamHooks) -> Outcome:
            try:
                async with hooks.call("fal", "m", {"prompt": "p"}) as call:
                    if call.handle is None:
                        if name == "a":
                            on_the_wire.set()
                            await answer.wait()
                        await call.accepted({"request_id": f"req-{name}"})
            except asyncio.CancelledError:
                ended.append(f"{name} stopped, detached={hooks.detached}")
                raise
            return ({"created": 1, "data": [], "by": name}, {})
        return execute

    settings = JobsSettings(workers=1, poll_seconds=30.0, lease_seconds=0.6)
    frozen = asyncio.Event()

    async def frozen_renew(*_: Any, **__: Any) -> bool | None:
        await frozen.wait()
        return None

    a = JobRunner(stalled, executor("a"), settings, lane_limits={"fal": 1})
    a.start()
    await asyncio.wait_for(on_the_wire.wait(), 5)
    stalled.renew = frozen_renew  # type: ignore[method-assign]  # paused: no heartbeat
    b = JobRunner(second, executor("b"), settings, lane_limits={"fal": 1})
    b.start()
    try:
        deadline = time.monotonic() + 10
        while (await second.get("imgjob_w")).status != "succeeded":  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        answer.set()  # A runs again: the upstream's answer to its submit is read
        deadline = time.monotonic() + 5
        while not ended:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        frozen.set()
        await a.stop()
        await b.stop()
    assert ended == ["a stopped, detached=True"]
    final = await second.get("imgjob_w")
    assert final is not None and final.result == {"created": 1, "data": [], "by": "b"}
    assert [h["request_id"] for h in final.handles.values()] == ["req-b"]
