"""fal's status stream (`GET {status_url}/stream`, SSE; fal-protocol.md §4.4): one request per job
instead of a status poll every 0.5-3 s.

`StatusStream.follow` returns the COMPLETED status event, or why it has none:

    UNSUPPORTED  the deployment does not serve the stream: 404, 405 or 501, or a 200 that is not
                 `text/event-stream`. Remembered for the life of the process: every later job
                 polls at once instead of paying a request to learn it again.
    BROKEN       the stream failed or ended before COMPLETED (connection lost, read timeout, an
                 error status): this job polls; the next one tries the stream again.
    BUSY         `status_stream_max` streams are open already: this job polls. A stream holds an
                 upstream connection (a file descriptor) for the whole job. The default cap is a
                 share of the open-file limit (`stream_slots`): a quarter of it is left to upstream
                 connections by the server's connection cap, and 1,000 of those stay for the
                 pool of submits, polls and results; the shared client's per-host limit is raised
                 by the same number (app.py), so streams never queue submits behind them.

In every case the caller polls the same job: nothing is submitted again.
"""

from __future__ import annotations

import enum
import logging
import resource
from typing import Any

import httpx

from imagegate.providers.fal.progress import ProgressReporter
from imagegate.providers.fal.wire import sse_event
from imagegate.settings import FalSettings

__all__ = ["NO_STREAM_STATUSES", "SSE_READ_TIMEOUT", "StatusStream", "StreamMiss", "stream_slots"]

log = logging.getLogger("imagegate.providers.fal")

SSE_READ_TIMEOUT = 30.0  # fal sends a keep-alive comment every 15 s
NO_STREAM_STATUSES = frozenset({404, 405, 501})
POOL_RESERVE = 1_000  # upstream connections left to submits, polls and results
MAX_AUTO_SLOTS = 10_000


def stream_slots(config: FalSettings) -> int:
    """How many status streams may be open at once: `status_stream_max`, else a quarter of the
    open-file limit less POOL_RESERVE (at most MAX_AUTO_SLOTS; 0 = always poll)."""
    if not (config.status_stream or config.job_status_stream):
        return 0
    if config.status_stream_max is not None:
        return config.status_stream_max
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_AUTO_SLOTS
    return max(0, min(MAX_AUTO_SLOTS, soft // 4 - POOL_RESERVE))


class StreamMiss(enum.Enum):
    UNSUPPORTED = "unsupported"
    BROKEN = "broken"
    BUSY = "busy"


class StatusStream:
    """The status stream of one fal configuration, per process: open streams and whether fal
    serves the stream at all."""

    def __init__(self, http: httpx.AsyncClient, max_open: int) -> None:
        self.http = http
        self.max_open = max_open
        self.open = 0
        self.unsupported: str | None = None  # why, once fal answered that it does not stream

    @property
    def usable(self) -> bool:
        return self.unsupported is None

    async def follow(
        self, url: httpx.URL, headers: dict[str, str], report: ProgressReporter | None
    ) -> dict[str, Any] | StreamMiss:
        if self.unsupported is not None:
            return StreamMiss.UNSUPPORTED
        if self.open >= self.max_open:
            return StreamMiss.BUSY
        self.open += 1
        try:
            return await self._follow(url, headers, report)
        finally:
            self.open -= 1

    async def _follow(
        self, url: httpx.URL, headers: dict[str, str], report: ProgressReporter | None
    ) -> dict[str, Any] | StreamMiss:
        timeout = httpx.Timeout(SSE_READ_TIMEOUT, connect=10.0)
        try:
            async with self.http.stream("GET", url, headers=headers, timeout=timeout) as response:
                ctype = response.headers.get("content-type", "")
                if response.status_code in NO_STREAM_STATUSES or (
                    response.status_code == 200 and not ctype.startswith("text/event-stream")
                ):
                    self._unsupported(f"HTTP {response.status_code} {ctype or 'without a content type'}")
                    return StreamMiss.UNSUPPORTED
                if response.status_code != 200:
                    return StreamMiss.BROKEN
                data: list[str] = []
                async for line in response.aiter_lines():
                    if line:
                        field, _, value = line.partition(":")
                        if field == "data":
                            data.append(value.removeprefix(" "))
                        continue
                    event, data = sse_event(data), []
                    if event is not None and report is not None:
                        await report(event)
                    if event is not None and event.get("status") == "COMPLETED":
                        return event
                event = sse_event(data)
                if event is not None and event.get("status") == "COMPLETED":
                    return event
                return StreamMiss.BROKEN
        except httpx.HTTPError:
            return StreamMiss.BROKEN

    def _unsupported(self, why: str) -> None:
        if self.unsupported is None:
            self.unsupported = why
            log.warning("fal does not serve the status stream (%s); polling from now on", why)
