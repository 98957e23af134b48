"""At most `server.starts_per_tick` new requests start per event-loop iteration; the rest wait their
turn, in arrival order, with their sockets paused.

Why: an event loop runs every callback that is ready before it looks at its sockets again. When
thousands of requests arrive at once (a burst of 10,000 slow generations), one iteration would
parse and start all of them (~1-2 ms each: routing, validation, the upstream submit), and for
seconds nothing else runs: `/healthz` waited up to 1.6 s, and the kernel's accept queue filled.
Starting a bounded number per iteration costs the same CPU in total but lets the work in
progress, new connections and health checks in between. `GET /healthz` and `GET /readyz` never
wait here.

`starts_per_tick` is the most an iteration starts. While iterations take longer than
ITERATION_BUDGET (the loop is saturated: the jobs already in flight fill it), fewer start: the
allowance is scaled by budget / last iteration's length each iteration (at most doubling, at least
one start), so an iteration converges on the budget whatever a request costs. The work in flight
and health checks then wait one short iteration, not the work of 64 new requests (with 10,000
jobs in flight and 64 starts every iteration, `/healthz` p99 was 280-410 ms). No CPU is left
idle: a start is only put off while other work is ready to run, and the allowance grows back as
soon as iterations are short again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["HEALTH_REQUESTS", "ITERATION_BUDGET", "StartPacer"]

HEALTH_REQUESTS = (b"GET /healthz ", b"GET /healthz?", b"GET /readyz ", b"GET /readyz?")
ITERATION_BUDGET = 0.02  # seconds: iterations longer than this let fewer new requests start


class StartPacer:
    """`try_start()` takes one of this iteration's starts; `defer(resume)` queues a request that got
    none: `resume()` runs in a later iteration and returns False if it no longer needs a start
    (its connection closed meanwhile)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, per_tick: int, budget: float = ITERATION_BUDGET) -> None:
        self.loop = loop
        self.per_tick = per_tick
        self.budget = budget
        self.allowance = float(per_tick)  # starts this iteration may take (module docstring)
        self.started = 0
        self.waiting: deque[Callable[[], bool]] = deque()
        self._tick_armed = False
        self._last_tick: float | None = None  # the previous iteration's tick, while ticks run back to back

    def try_start(self) -> bool:
        if self.waiting or self.started >= self.allowance:
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
        """A new iteration: the count starts again, scaled to how long the last iteration took,
        and the longest-waiting requests go first."""
        now = self.loop.time()
        self._tick_armed = False
        if self._last_tick is None:
            self.allowance = float(self.per_tick)
        else:
            took = max(now - self._last_tick, 1e-6)
            self.allowance = min(float(self.per_tick), max(1.0, self.allowance * min(2.0, self.budget / took)))
        self.started = 0
        while self.waiting and self.started < self.allowance:
            if self.waiting.popleft()():
                self.started += 1
        if self.started or self.waiting:
            self._arm()
            self._last_tick = now
        else:  # idle: the next burst starts at the full rate
            self._last_tick = None
            self.allowance = float(self.per_tick)
