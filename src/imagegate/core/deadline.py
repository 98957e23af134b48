"""`within(delay)`: `asyncio.timeout(delay)` for the hot path, as a plain context manager.

Every request runs its route under a timeout (and a fal queue job its status and result under
another); `asyncio.Timeout` is an async context manager with a state machine and rescheduling that
cost about three times its timer. `within` keeps only what a block that is never rescheduled needs,
with the same outcome: when the delay passes, the task is cancelled and the block's
`CancelledError` leaves it as `TimeoutError` (chained from it), unless the task was also cancelled
from outside, which then propagates as the `CancelledError` it is.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

__all__ = ["within"]


class within:  # lower case: used as `asyncio.timeout` is, `with within(seconds):`
    """Cancel the current task if the block runs longer than `delay` seconds (loop time, as
    `asyncio.timeout`); the block then raises `TimeoutError`. Must be entered in a task."""

    __slots__ = ("_cancelling", "_delay", "_expired", "_handle", "_task")

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._expired = False
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Timeout should be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        loop = asyncio.get_running_loop()
        when = loop.time() + self._delay
        if when <= loop.time():
            self._handle = loop.call_soon(self._on_timeout)
        else:
            self._handle = loop.call_at(when, self._on_timeout)

    def _on_timeout(self) -> None:
        self._task.cancel()
        self._expired = True
        self._handle = None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: TracebackType | None
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        # as asyncio.Timeout: the cancel it sent is taken back whatever the block raised
        if self._expired and self._task.uncancel() <= self._cancelling and kind is not None and issubclass(
            kind, asyncio.CancelledError
        ):
            raise TimeoutError from error
