"""`MemoryLimiter`: one process's limits. Each check-and-take runs without an `await`, so it is atomic
on the event loop."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from imagegate.auth.keys import KeyLimits
from imagegate.limits.base import WINDOW_SECONDS, Decision, Limiter

__all__ = ["MemoryLimiter"]


@dataclass
class _Window:
    requests: deque[float] = field(default_factory=deque)  # admission times
    images: deque[float] = field(default_factory=deque)  # one entry per image
    in_flight: set[str] = field(default_factory=set)


class MemoryLimiter(Limiter):
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    async def _acquire(self, name: str, limits: KeyLimits, images: int, token: str) -> Decision:
        now = self._clock()
        w = self._windows.setdefault(name, _Window())
        for times in (w.requests, w.images):
            while times and times[0] <= now - WINDOW_SECONDS:
                times.popleft()
        reqs, imgs = len(w.requests), len(w.images)

        def expiry(times: deque[float], index: int) -> float:
            return max(0.0, times[index] + WINDOW_SECONDS - now) if len(times) > index else 0.0

        if limits.rpm is not None and reqs >= limits.rpm:
            wait = expiry(w.requests, reqs - limits.rpm)
            return Decision("requests", reqs, imgs, reset_requests=wait, retry_after=wait)
        if limits.images_per_minute is not None:
            if images > limits.images_per_minute:
                return Decision("too_many_images", reqs, imgs)
            if imgs + images > limits.images_per_minute:
                wait = expiry(w.images, imgs + images - limits.images_per_minute - 1)
                return Decision("images", reqs, imgs, reset_images=wait, retry_after=wait)
        if limits.max_concurrent is not None:
            if len(w.in_flight) >= limits.max_concurrent:
                return Decision("concurrency", reqs, imgs, retry_after=1.0)
            w.in_flight.add(token)
        if limits.rpm is not None:
            w.requests.append(now)
            reqs += 1
        if limits.images_per_minute is not None:
            w.images.extend([now] * images)
            imgs += images
        return Decision(None, reqs, imgs, reset_requests=expiry(w.requests, 0), reset_images=expiry(w.images, 0))

    async def _release(self, name: str, token: str) -> None:
        window = self._windows.get(name)
        if window is not None:
            window.in_flight.discard(token)

    def in_flight(self, name: str) -> int:
        window = self._windows.get(name)
        return len(window.in_flight) if window else 0
