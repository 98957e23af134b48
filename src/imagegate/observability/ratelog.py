"""A log line for a condition that can recur thousands of times a second (a full connection
table, `accept()` out of file descriptors): the first event is logged at once, later ones are
counted and reported together at most once per interval."""

from __future__ import annotations

import asyncio
import logging
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """``hit(*args)`` records one event; the message is ``format % (*args, count)``."""

    def __init__(self, logger: logging.Logger, interval: float, format: str, level: int = logging.WARNING) -> None:
        self.logger = logger
        self.interval = interval
        self.format = format
        self.level = level
        self.total = 0
        self._pending = 0
        self._args: tuple[object, ...] = ()
        self._last = -float("inf")
        self._flush_scheduled = False

    def hit(self, *args: object) -> None:
        self.total += 1
        self._pending += 1
        self._args = args
        now = time.monotonic()
        if now - self._last >= self.interval:
            self.flush()
        elif not self._flush_scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # reported with the next event after the interval
            self._flush_scheduled = True
            loop.call_later(self._last + self.interval - now, self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._pending:
            self.logger.log(self.level, self.format, *self._args, self._pending)
            self._pending = 0
            self._last = time.monotonic()
