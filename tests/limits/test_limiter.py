"""The limiters, in memory and on the real Redis, through the same cases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from tests.redis_support import redis_prefix, redis_url

from imagegate.auth.keys import KeyLimits
from imagegate.limits import Decision, Limiter, MemoryLimiter, RateLimitExceeded, RedisLimiter, format_reset
from imagegate.settings import RedisSettings
from imagegate.state.redis import connect

__all__ = ["redis_prefix", "redis_url"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    if request.param == "memory":
        yield MemoryLimiter()
        return
    prefix = request.getfixturevalue("redis_prefix")
    client = connect(RedisSettings(url=request.getfixturevalue("redis_url")))
    assert client is not None
    yield RedisLimiter(client, prefix=prefix, lease_seconds=30)
    await client.aclose()


async def in_flight(limiter: Limiter, name: str) -> int:
    if isinstance(limiter, MemoryLimiter):
        return limiter.in_flight(name)
    assert isinstance(limiter, RedisLimiter)
    return await limiter.in_flight(name)


async def test_rpm_admits_exactly_the_limit_then_429_with_headers(limiter: Limiter) -> None:
    limits = KeyLimits(rpm=3)
    seen = []
    for _ in range(3):
        async with limiter.admit("k", limits, 1) as admission:
            seen.append(admission.headers["x-ratelimit-remaining-requests"])
    assert seen == ["2", "1", "0"]
    assert admission.headers["x-ratelimit-limit-requests"] == "3"
    with pytest.raises(RateLimitExceeded) as info:
        async with limiter.admit("k", limits, 1):
            pytest.fail("admitted over the limit")
    error = info.value
    assert (error.status, error.code, error.type) == (429, "rate_limit_exceeded", "rate_limit_error")
    assert error.retry_after is not None and 1 <= error.retry_after <= 60
    assert error.extra_headers["x-ratelimit-remaining-requests"] == "0"
    assert error.extra_headers["x-ratelimit-reset-requests"].endswith("s")
    async with limiter.admit("other", limits, 1):  # limits are per key
        pass


async def test_images_per_minute_counts_n_and_a_refusal_takes_nothing(limiter: Limiter) -> None:
    limits = KeyLimits(rpm=10, images_per_minute=5)
    async with limiter.admit("k", limits, 4) as admission:
        assert admission.headers["x-ratelimit-remaining-images"] == "1"
    with pytest.raises(RateLimitExceeded) as info:
        async with limiter.admit("k", limits, 2):
            pass
    assert "images per minute" in info.value.message
    async with limiter.admit("k", limits, 1) as admission:  # the refused request took no request or image
        assert admission.headers["x-ratelimit-remaining-requests"] == "8"
        assert admission.headers["x-ratelimit-remaining-images"] == "0"


async def test_more_images_than_the_per_minute_limit_is_never_retried(limiter: Limiter) -> None:
    with pytest.raises(RateLimitExceeded) as info:
        async with limiter.admit("k", KeyLimits(images_per_minute=3), 4):
            pass
    assert info.value.extra_headers["x-should-retry"] == "false" and info.value.retry_after is None


async def test_concurrency_slot_released_on_success_error_and_cancellation(limiter: Limiter) -> None:
    limits = KeyLimits(max_concurrent=1)
    async with limiter.admit("k", limits, 1):
        assert await in_flight(limiter, "k") == 1
        with pytest.raises(RateLimitExceeded) as info:
            async with limiter.admit("k", limits, 1):
                pass
        assert "in flight" in info.value.message and info.value.retry_after == 1.0
    assert await in_flight(limiter, "k") == 0  # success

    with pytest.raises(ValueError):
        async with limiter.admit("k", limits, 1):
            raise ValueError("upstream failed")
    assert await in_flight(limiter, "k") == 0  # error

    entered = asyncio.Event()

    async def hold() -> None:
        async with limiter.admit("k", limits, 1):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(hold())
    await entered.wait()
    assert await in_flight(limiter, "k") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await in_flight(limiter, "k") == 0  # cancellation (a client disconnect cancels the same way)


async def test_a_caller_cancelled_while_its_acquire_is_in_flight_leaks_no_slot(
    limiter: Limiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The acquire script has taken the slot but its reply has not arrived when the client goes
    away: the slot must be given back at once, not held until its lease (30 s) runs out."""
    limits = KeyLimits(max_concurrent=1)
    real_acquire = limiter._acquire
    taken = asyncio.Event()

    async def slow_reply(name: str, limits: KeyLimits, images: int, token: str) -> Decision:
        decision = await real_acquire(name, limits, images, token)
        taken.set()
        await asyncio.sleep(0.2)  # the reply is still on its way
        return decision

    monkeypatch.setattr(limiter, "_acquire", slow_reply)

    async def admitted() -> None:
        async with limiter.admit("k", limits, 1):
            raise AssertionError("the cancelled caller must not be admitted")

    task = asyncio.create_task(admitted())
    await taken.wait()
    assert await in_flight(limiter, "k") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.setattr(limiter, "_acquire", real_acquire)
    for _ in range(100):  # released as soon as the in-flight acquire returns
        if await in_flight(limiter, "k") == 0:
            break
        await asyncio.sleep(0.01)
    assert await in_flight(limiter, "k") == 0
    async with limiter.admit("k", limits, 1):
        pass


async def test_concurrent_admissions_never_exceed_the_limit(limiter: Limiter) -> None:
    limits = KeyLimits(rpm=7)
    outcomes = await asyncio.gather(*(_try(limiter, limits) for _ in range(20)))
    assert outcomes.count(True) == 7


async def _try(limiter: Limiter, limits: KeyLimits) -> bool:
    try:
        async with limiter.admit("k", limits, 1):
            return True
    except RateLimitExceeded:
        return False


async def test_no_limits_admit_without_state(limiter: Limiter) -> None:
    async with limiter.admit("k", KeyLimits(), 5) as admission:
        assert admission.headers == {}


async def test_memory_window_slides() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    limits = KeyLimits(rpm=2)
    for _ in range(2):
        async with limiter.admit("k", limits, 1):
            clock.now += 10
    with pytest.raises(RateLimitExceeded) as info:
        async with limiter.admit("k", limits, 1):
            pass
    assert info.value.retry_after == pytest.approx(40)  # the first request leaves the window at +60
    clock.now += 40
    async with limiter.admit("k", limits, 1):
        pass


async def test_redis_slot_of_a_crashed_process_expires_with_its_lease(redis_url: str, redis_prefix: str) -> None:
    client = connect(RedisSettings(url=redis_url))
    assert client is not None
    limiter = RedisLimiter(client, prefix=redis_prefix, lease_seconds=0.6)
    limits = KeyLimits(max_concurrent=1)
    # A "crashed" holder: the slot is taken and never released.
    decision = await limiter._acquire("k", limits, 1, "crashed-token")
    assert decision.refused is None
    with pytest.raises(RateLimitExceeded):
        async with limiter.admit("k", limits, 1):
            pass
    await asyncio.sleep(0.7)
    async with limiter.admit("k", limits, 1):  # the lease ran out
        pass
    # A live holder renews its lease well past it.
    async with limiter.admit("k", limits, 1):
        await asyncio.sleep(1.5)
        assert await limiter.in_flight("k") == 1
    assert await limiter.in_flight("k") == 0
    await client.aclose()


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.02, "20ms"), (1, "1s"), (12.5, "12.5s"), (60, "1m0s"), (59.0341, "59.034s")]
)
def test_format_reset_like_openai(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text
