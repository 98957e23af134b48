"""At most `server.starts_per_tick` new requests start per event-loop iteration; the rest wait their
turn, in arrival order, with their sockets paused.

Why: an event loop runs every callback that is ready before it looks at its sockets again. When
thousands of requests arrive at once (a burst of 10,000 slow generations), one iteration would
parse and start all of them (~1-2 ms each: routing, validation, the upstream submit), and for
seconds nothing else runs: `/healthz` waited up to 1.6 s, and the kernel's accept queue filled.
Starting a bounded number per iteration costs the same CPU in total but lets the work in
progress, new connections and health checks in between. `GET /healthz` and `GET /readyz` never
wait here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["HEALTH_REQUESTS", "StartPacer"]

HEALTH_REQUESTS = (b"GET /healthz ", b"GET /healthz?", b"GET /readyz ", b"GET /readyz?")


class StartPacer:
    """`try_start()` takes one of this iteration's starts; `defer(resume)` queues a request that got
    none: `resume()` runs in a later iteration and returns False if it no longer needs a start
    (its connection closed meanwhile)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, per_tick: int) -> None:
        self.loop = loop
        self.per_tick = per_tick
        self.started = 0
        self.waiting: deque[Callable[[], bool]] = deque()
        self._tick_armed = False

    def try_start(self) -> bool:
        if self.waiting or self.started >= self.per_tick:
            return False
        self.started += 1
        self._arm()
        return True

    def defer(self, resume: Callable[[], bool]) -> None:
        self.waiting.append(resume)
        self._arm()

    def _arm(self) -> None:
        if not self._tick_armed:
            self._tick_armed = True
            self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        """A new iteration: the count starts again and the longest-waiting requests go first."""
        self._tick_armed = False
        self.started = 0
        while self.waiting and self.started < self.per_tick:
            if self.waiting.popleft()():
                self.started += 1
        if self.started or self.waiting:
            self._arm()
