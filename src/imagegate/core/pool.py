"""The bounded pool that runs all CPU-bound image work off the event loop, and its cancellation.

A job is a plain function run in a worker thread with a per-job cancellation flag: when the task
awaiting ``ImagePool.run`` is cancelled (the client went away, the deadline passed), the flag is
set and the job raises :class:`Cancelled` at its next :func:`checkpoint` (``imaging.check_pixels``
is one), so it stops consuming CPU at the next operation boundary; a job still queued never starts.

``ImagePool.run`` turns a ``MemoryError`` into :class:`~imagegate.core.errors.InsufficientResources`
(503); the worker thread is free for the next job whatever a job raised.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from imagegate.core.errors import GatewayError, InsufficientResources

__all__ = ["Cancelled", "ImagePool", "checkpoint"]

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger("imagegate.imaging")


class Cancelled(Exception):
    """The pool job's awaiting task was cancelled; raised at the next operation boundary."""


# The cancellation flag of the pool job running in this thread (set by `ImagePool.run`).
_JOB_CANCELLED: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "imagegate_job_cancelled", default=None
)


def checkpoint() -> None:
    """An operation boundary: raise :class:`Cancelled` if this pool job's caller has gone away."""
    cancelled = _JOB_CANCELLED.get()
    if cancelled is not None and cancelled.is_set():
        raise Cancelled("the image job was cancelled")


class ImagePool:
    """A bounded thread pool for image work, so it never runs on the event loop.

    ``workers`` defaults to ``os.cpu_count()``. Jobs beyond that wait in the executor's queue.
    A cancelled ``run`` drops a job that has not started and sets the cancellation flag of one
    that has: the job raises :class:`Cancelled` at its next :func:`checkpoint` (or ``check_pixels``).
    """

    def __init__(self, workers: int | None = None) -> None:
        count = (os.cpu_count() or 1) if workers is None else workers
        if count < 1:
            raise ValueError(f"workers must be at least 1, got {count}")
        self.workers = count
        self._executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix="imagegate-image")

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` in a worker thread (with the caller's contextvars).

        Exceptions from ``fn`` propagate as they are (the service and the HTTP layer render
        unexpected ones as a 500 envelope), except ``MemoryError``, which becomes
        ``InsufficientResources`` (503, ``retry-after``) without keeping the frames that filled memory."""
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()
        call = functools.partial(contextvars.copy_context().run, _job, cancelled, fn, *args, **kwargs)
        job = loop.run_in_executor(self._executor, call)  # RuntimeError once closed
        failure: GatewayError
        try:
            return await job
        except asyncio.CancelledError:
            cancelled.set()  # the job stops at its next operation boundary
            raise
        except MemoryError:
            # Not chained: the MemoryError's traceback holds the frames (and images) that filled memory.
            log.warning("image work ran out of memory in %s", getattr(fn, "__name__", fn))
            failure = InsufficientResources("The gateway ran out of memory processing this image; retry later.")
        raise failure

    def close(self) -> None:
        """Wait for running jobs, drop queued ones; later ``run`` calls raise ``RuntimeError``."""
        self._executor.shutdown(wait=True, cancel_futures=True)


def _job(cancelled: threading.Event, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """In a worker thread, inside the job's own context copy: the job's flag, then ``fn``."""
    if cancelled.is_set():
        raise Cancelled("the image job was cancelled before it started")
    _JOB_CANCELLED.set(cancelled)
    return fn(*args, **kwargs)
