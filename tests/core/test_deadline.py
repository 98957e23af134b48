"""`within` ends a block as `asyncio.timeout` does: the same exception in every case."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from imagegate.core.deadline import within


@contextlib.asynccontextmanager
async def _within(delay: float) -> AsyncIterator[None]:
    with within(delay):
        yield


Scope = Callable[[float], Any]
SCOPES = [pytest.param(asyncio.timeout, id="asyncio.timeout"), pytest.param(_within, id="within")]


async def _outcome(body: Callable[[], Any]) -> str:
    """What a task running `body` ends with, and whether it is still marked cancelled."""
    task = asyncio.ensure_future(body())
    await asyncio.sleep(0)
    try:
        result = await task
    except asyncio.CancelledError:
        return "cancelled"
    except TimeoutError as exc:
        assert isinstance(exc.__cause__, asyncio.CancelledError)
        return "timeout"
    return f"{result} cancelling={task.cancelling()}"


@pytest.mark.parametrize("scope", SCOPES)
async def test_a_block_that_overruns_raises_timeout_error(scope: Scope) -> None:
    async def body() -> str:
        async with scope(0.01):
            await asyncio.sleep(5)
        return "done"

    assert await _outcome(body) == "timeout"


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("delay", [0.0, -1.0])
async def test_no_time_left_times_out_at_the_first_await(scope: Scope, delay: float) -> None:
    async def body() -> str:
        async with scope(delay):
            await asyncio.sleep(0)
            await asyncio.sleep(5)
        return "done"

    assert await _outcome(body) == "timeout"


@pytest.mark.parametrize("scope", SCOPES)
async def test_a_block_in_time_returns_and_leaves_no_timer(scope: Scope) -> None:
    async def body() -> str:
        async with scope(0.05):
            await asyncio.sleep(0)
        await asyncio.sleep(0.1)  # past the delay: nothing cancels the task later
        return "done"

    assert await _outcome(body) == "done cancelling=0"


@pytest.mark.parametrize("scope", SCOPES)
async def test_a_cancel_from_outside_stays_a_cancel(scope: Scope) -> None:
    async def body() -> str:
        async with scope(5):
            await asyncio.sleep(5)
        return "done"

    task = asyncio.ensure_future(body())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("scope", SCOPES)
async def test_a_cancel_from_outside_as_well_as_the_timeout_stays_a_cancel(scope: Scope) -> None:
    async def body() -> str:
        async with scope(0.01):
            try:
                await asyncio.sleep(5)
            finally:
                asyncio.current_task().cancel()  # type: ignore[union-attr]
                await asyncio.sleep(0)
        return "done"

    assert await _outcome(body) == "cancelled"


@pytest.mark.parametrize("scope", SCOPES)
async def test_a_block_that_swallows_the_cancel_is_uncancelled(scope: Scope) -> None:
    async def body() -> str:
        async with scope(0.01):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(5)
        return "done"

    assert await _outcome(body) == "done cancelling=0"


@pytest.mark.parametrize("scope", SCOPES)
async def test_nested_the_inner_one_that_expires_raises(scope: Scope) -> None:
    async def body() -> str:
        async with scope(5):
            try:
                async with scope(0.01):
                    await asyncio.sleep(5)
            except TimeoutError:
                return "inner"
        return "done"

    assert await _outcome(body) == "inner cancelling=0"


async def test_outside_a_task_it_refuses() -> None:
    def enter() -> None:
        with within(1):
            pass

    with pytest.raises(RuntimeError):
        await asyncio.get_running_loop().run_in_executor(None, enter)
