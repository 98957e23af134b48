"""The idempotency guard on both stores: fingerprints, TTL, crashed owners, cancelled owners."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.redis_support import redis_prefix, redis_url

from imagegate.core.request import ImageRequest, InputImage
from imagegate.core.results import ImageResult, OutputImage
from imagegate.idempotency import Idempotency, IdempotencyKeyReused, MemoryStore, RedisStore, fingerprint
from imagegate.idempotency.codec import restore, skeleton
from imagegate.settings import RedisSettings
from imagegate.state.redis import connect
from imagegate.storage.local import LocalStorage

__all__ = ["redis_prefix", "redis_url"]

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


def request(prompt: str = "x", image: bytes = PNG) -> ImageRequest:
    return ImageRequest(operation="edit", prompt=prompt, model="m", images=[InputImage(data=image, format="png")])


def result() -> ImageResult:
    return ImageResult(
        created=1,
        data=[OutputImage(b64_json=base64.b64encode(PNG).decode()), OutputImage(url="https://x/y.png")],
        size="8x8",
        output_format="png",
        quality="high",
        background="opaque",
        headers={"x-imagegate-provider": "p", "x-ratelimit-remaining-requests": "3", "x-imagegate-cost-usd": "1"},
        usage={"images": 2},
    )


class Work:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.delay = delay
        self.fail = fail

    async def __call__(self) -> ImageResult:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("upstream failed")
        return result()


@pytest.fixture(params=["memory", "redis"])
async def guard(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Idempotency]:
    storage = LocalStorage(tmp_path / "images")
    if request.param == "memory":
        yield Idempotency(MemoryStore(), storage, ttl_seconds=1, lease_seconds=1.0, max_wait_seconds=5)
    else:
        client = connect(RedisSettings(url=request.getfixturevalue("redis_url")))
        assert client is not None
        store = RedisStore(client, prefix=request.getfixturevalue("redis_prefix"))
        yield Idempotency(store, storage, ttl_seconds=1, lease_seconds=1.0, max_wait_seconds=5)
        await client.aclose()
    await storage.close()


def test_fingerprint_follows_the_parsed_request() -> None:
    assert fingerprint(request()) == fingerprint(request())
    assert fingerprint(request()) != fingerprint(request(prompt="y"))
    assert fingerprint(request()) != fingerprint(request(image=PNG + b"\0"))


async def test_replay_restores_the_whole_result_without_volatile_headers(guard: Idempotency) -> None:
    work = Work()
    first = await guard.run("k", "key-1", request(), work)
    again = await guard.run("k", "key-1", request(), work)
    assert work.calls == 1
    assert again.data == first.data and again.usage == first.usage and again.size == "8x8"
    assert again.headers == {"x-imagegate-provider": "p", "idempotent-replayed": "true"}


async def test_record_expires_with_its_ttl(guard: Idempotency) -> None:
    work = Work()
    await guard.run("k", "key-ttl", request(), work)
    await asyncio.sleep(1.1)
    await guard.run("k", "key-ttl", request(), work)
    assert work.calls == 2


async def test_failure_and_cancellation_store_nothing(guard: Idempotency) -> None:
    failing = Work(fail=True)
    with pytest.raises(RuntimeError):
        await guard.run("k", "key-f", request(), failing)
    slow = Work(delay=5)
    task = asyncio.create_task(guard.run("k", "key-f", request(), slow))
    await asyncio.sleep(0.05)
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task
    ok = Work()
    await guard.run("k", "key-f", request(), ok)
    assert (failing.calls, slow.calls, ok.calls) == (1, 1, 1)


async def test_waiter_takes_over_when_the_first_is_cancelled(guard: Idempotency) -> None:
    slow, second = Work(delay=5), Work(delay=0.05)
    first = asyncio.create_task(guard.run("k", "key-w", request(), slow))
    await asyncio.sleep(0.05)
    waiter = asyncio.create_task(guard.run("k", "key-w", request(), second))
    await asyncio.sleep(0.1)
    assert second.calls == 0  # waiting for the first
    first.cancel()
    replayed = await asyncio.wait_for(waiter, 3)
    assert second.calls == 1 and "idempotent-replayed" not in replayed.headers


async def test_a_crashed_owner_is_taken_over_after_its_lease(guard: Idempotency) -> None:
    from imagegate.idempotency import Record

    key = guard.record_key("k", "key-crash")
    await guard.store.claim(key, Record("pending", fingerprint(request()), "dead-owner"), 0.3)
    work = Work()
    await asyncio.wait_for(guard.run("k", "key-crash", request(), work), 3)
    assert work.calls == 1


async def test_other_request_same_key_is_409(guard: Idempotency) -> None:
    await guard.run("k", "key-409", request(), Work())
    with pytest.raises(IdempotencyKeyReused) as info:
        await guard.run("k", "key-409", request(prompt="other"), Work())
    assert (info.value.status, info.value.code) == (409, "idempotency_key_reused")
    await guard.run("other-client", "key-409", request(prompt="other"), Work())  # per client key


async def test_skeleton_keeps_image_bytes_out_of_the_record(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    record = await skeleton(result(), storage, ttl_seconds=60)
    assert base64.b64encode(PNG).decode()[:40] not in str(record) and len(str(record)) < 600
    assert (await restore(record, storage)).data == result().data
    await storage.close()


async def test_the_fingerprint_is_hashed_off_the_event_loop(
    guard: Idempotency, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing a 100 MB edit takes hundreds of milliseconds: it must not stall every other request."""
    import threading

    from imagegate.idempotency import guard as guard_module

    threads: list[threading.Thread] = []

    def recording(value: ImageRequest) -> str:
        threads.append(threading.current_thread())
        return fingerprint(value)

    monkeypatch.setattr(guard_module, "fingerprint", recording)
    await guard.run("k", "key-thread", request(), Work())
    assert threads and all(t is not threading.main_thread() for t in threads)


async def test_a_full_memory_store_does_not_scan_every_record_on_every_claim() -> None:
    """At `max_records`, making room evicts a tenth of the records at once (oldest first), so the
    O(records) sweep runs once per many claims, not on each one (on the event loop)."""
    from imagegate.idempotency.store import Record

    store = MemoryStore(max_records=1000)
    sweeps = 0
    sweep = store._sweep

    def counting() -> None:
        nonlocal sweeps
        sweeps += 1
        sweep()

    store._sweep = counting  # type: ignore[method-assign]
    for i in range(5000):
        assert await store.claim(f"k{i}", Record("pending", "f", "o"), 3600) is None
    assert len(store._records) <= 1000
    assert sweeps <= 50
    assert store._live("k4999") is not None and store._live("k0") is None  # the oldest went first


async def test_a_client_leaving_while_the_paid_result_is_stored_still_stores_it(guard: Idempotency) -> None:
    """The work succeeded (and was paid for); the client disconnects while its images are written to
    the storage. The record must still be completed: the SDK's retry replays, it does not pay again."""
    real_put = guard.storage.put
    writing = asyncio.Event()

    async def slow_put(data: bytes, **kwargs: object) -> str:
        writing.set()
        await asyncio.sleep(0.3)
        return await real_put(data, **kwargs)  # type: ignore[arg-type]

    guard.storage.put = slow_put  # type: ignore[method-assign]
    work = Work()
    task = asyncio.create_task(guard.run("k", "key-store", request(), work))
    await asyncio.wait_for(writing.wait(), 3)
    task.cancel()  # the client went away after the upstream work was done
    with pytest.raises(asyncio.CancelledError):
        await task
    again = await asyncio.wait_for(guard.run("k", "key-store", request(), work), 5)
    assert work.calls == 1 and again.headers.get("idempotent-replayed") == "true"


async def test_a_replay_whose_stored_images_are_gone_is_a_final_409_and_never_runs_again(
    guard: Idempotency, tmp_path: Path
) -> None:
    """A storage lifecycle rule shorter than the idempotency TTL removes the images under a live
    record: the replay is a clean 409 `idempotency_result_expired` the SDKs do not retry (not a 500
    they would retry), and the upstream work is not run again under the same key."""
    import json

    from imagegate.api.errors import gateway_error_response
    from imagegate.idempotency.codec import IdempotencyResultExpired

    work = Work()
    await guard.run("k", "key-gone", request(), work)
    for stored in (tmp_path / "images").rglob("*"):
        if stored.is_file():
            stored.unlink()
    with pytest.raises(IdempotencyResultExpired) as info:
        await guard.run("k", "key-gone", request(), work)
    assert work.calls == 1
    response = gateway_error_response(info.value, "req_1")
    assert response.status_code == 409
    assert response.headers["x-should-retry"] == "false"
    error = json.loads(bytes(response.body))["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "idempotency_result_expired",
        "Idempotency-Key",
    )


async def test_a_late_owner_completing_after_its_lease_ran_out_never_overwrites_a_newer_claim(
    guard: Idempotency,
) -> None:
    from imagegate.idempotency import Record

    key = guard.record_key("k", "key-late")
    late = Record("pending", "f", "late-owner")
    assert await guard.store.claim(key, late, 0.1) is None
    await asyncio.sleep(0.2)  # its lease runs out; a retry claims the key
    newer = Record("pending", "f", "newer-owner")
    assert await guard.store.claim(key, newer, 5) is None
    await guard.store.complete(key, Record("done", "f", "late-owner", {"stale": True}), 60)
    assert await guard.store.claim(key, Record("pending", "f", "third"), 5) == newer
    # the owner itself completes, and a record whose lease lapsed unclaimed is still completed
    await guard.store.complete(key, Record("done", "f", "newer-owner", {"ok": True}), 60)
    assert await guard.store.claim(key, Record("pending", "f", "third"), 5) == Record(
        "done", "f", "newer-owner", {"ok": True}
    )
    other = guard.record_key("k", "key-lapsed")
    assert await guard.store.claim(other, Record("pending", "f", "slow"), 0.1) is None
    await asyncio.sleep(0.2)
    await guard.store.complete(other, Record("done", "f", "slow", {"ok": True}), 60)
    assert (await guard.store.claim(other, Record("pending", "f", "x"), 5)) == Record("done", "f", "slow", {"ok": True})
