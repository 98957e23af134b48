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

import codecs
import enum
import logging
import resource
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx
from httpx._client import ClientState
from httpx._decoders import LineDecoder

from imagegate.providers.fal.progress import ProgressReporter
from imagegate.providers.fal.wire import sse_event
from imagegate.settings import FalSettings
from imagegate.upstream_http import WireBody, WireTransport, response_extensions, timeouts
from imagegate.upstream_plain import UpstreamClient, plain_netloc
from imagegate.upstream_wire import WireError

__all__ = [
    "NO_STREAM_STATUSES", "SSE_READ_TIMEOUT", "StatusStream", "StreamMiss", "stream_slots", "stream_url",
]

log = logging.getLogger("imagegate.providers.fal")
_httpx_log = logging.getLogger("httpx")

SSE_READ_TIMEOUT = 30.0  # fal sends a keep-alive comment every 15 s
_TIMEOUT = httpx.Timeout(SSE_READ_TIMEOUT, connect=10.0)
_TIMEOUTS = timeouts(_TIMEOUT.pool, _TIMEOUT.connect, _TIMEOUT.read)
NO_STREAM_STATUSES = frozenset({404, 405, 501})
POOL_RESERVE = 1_000  # upstream connections left to submits, polls and results
MAX_AUTO_SLOTS = 10_000
MAX_EVENT_CHARS = 1024 * 1024  # a longer line or event breaks the stream (the job polls): memory stays bounded


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


def stream_url(status_url: str) -> str:
    """`{status_url}/stream`, its query kept: the URL httpx builds with
    `URL(status_url).copy_with(path=path.rstrip("/") + "/stream")`, without parsing a URL that
    httpx sends unchanged and that has no escapes (httpx would re-quote its decoded path)."""
    if "%" not in status_url and plain_netloc(status_url) is not None:
        base, mark, query = status_url.partition("?")
        return f"{base.rstrip('/')}/stream{mark}{query}"
    url = httpx.URL(status_url)
    return str(url.copy_with(path=url.path.rstrip("/") + "/stream"))


class StreamMiss(enum.Enum):
    UNSUPPORTED = "unsupported"
    BROKEN = "broken"
    BUSY = "busy"


class _TooLong(Exception):
    """A line or an event longer than MAX_EVENT_CHARS: not a status stream to buffer."""


class _Lines(LineDecoder):
    """httpx's line decoder (the lines `aiter_lines` yields), with a line that never ends bounded."""

    pending = 0  # characters of the unfinished line (counted as they come: a trickle stays linear)

    def decode(self, text: str) -> list[str]:
        lines = super().decode(text)
        if lines:
            self.pending = sum(map(len, self.buffer))  # what follows the last line break: one piece
        else:
            self.pending += len(text)
            if self.pending > MAX_EVENT_CHARS:
                raise _TooLong
        return lines


class _Events:
    """SSE lines -> events: `data` fields are joined, an empty line ends an event, other fields
    and comments (fal's keep-alives) are skipped."""

    __slots__ = ("count", "data", "size")

    def __init__(self) -> None:
        self.data: list[str] = []
        self.size = 0
        self.count = 0  # events so far (not counting empty ones: comments, keep-alives)

    def line(self, line: str) -> dict[str, Any] | None:
        if line:
            field, _, value = line.partition(":")
            if field == "data":
                self.data.append(value.removeprefix(" "))
                self.size += len(value)
                if self.size > MAX_EVENT_CHARS:
                    raise _TooLong
            return None
        event, self.data, self.size = sse_event(self.data), [], 0
        if event is not None:
            self.count += 1
        return event

    def end(self) -> dict[str, Any] | None:
        """The event left without its closing empty line when the stream ended (counted too)."""
        event = sse_event(self.data)
        if event is not None:
            self.count += 1
        return event


class StatusStream:
    """The status stream of one fal configuration, per process: open streams and whether fal
    serves the stream at all.

    On the shared upstream client (`upstream_plain.UpstreamClient`) the stream is read straight
    from its pool (`upstream_wire`), as that client's plain calls are: the same request on the wire (the same header
    list, the URL as given), the same `httpx` log line, the lines httpx's `aiter_lines` would
    yield (its decoders), and every failure a BROKEN stream as an httpx error would be; without
    httpx's request, response and stream objects and their async generators, which cost more per
    job than the stream itself. Any other client takes httpx's `stream()`."""

    def __init__(self, http: httpx.AsyncClient, max_open: int) -> None:
        self.http = http
        self.max_open = max_open
        self.open = 0
        self.unsupported: str | None = None  # why, once fal answered that it does not stream

    @property
    def usable(self) -> bool:
        return self.unsupported is None

    def free(self) -> bool:
        """A stream would be opened now (served, and a slot free)."""
        return self.unsupported is None and self.open < self.max_open

    async def follow(
        self,
        url: str,
        headers: dict[str, str],
        report: ProgressReporter | None,
        learn: Callable[[bool], None] | None = None,
    ) -> dict[str, Any] | StreamMiss:
        """The COMPLETED event, or why there is none. `learn`, when given, is told whether that
        event was the stream's first (the job was done when the stream opened)."""
        if self.unsupported is not None:
            return StreamMiss.UNSUPPORTED
        if self.open >= self.max_open:
            return StreamMiss.BUSY
        self.open += 1
        events = _Events()
        try:
            client = self.http
            plain = client.plain_get(url, headers) if isinstance(client, UpstreamClient) else None
            if plain is not None:
                assert isinstance(client, UpstreamClient)
                found = await self._follow_plain(client, url, *plain, events, report)
            else:
                found = await self._follow(url, headers, events, report)
        finally:
            self.open -= 1
        if learn is not None and not isinstance(found, StreamMiss):
            learn(events.count == 1)
        return found

    async def _follow(
        self, url: str, headers: dict[str, str], events: _Events, report: ProgressReporter | None
    ) -> dict[str, Any] | StreamMiss:
        try:
            async with self.http.stream("GET", url, headers=headers, timeout=_TIMEOUT) as response:
                miss = self._miss(response.status_code, response.headers.get("content-type", ""))
                if miss is not None:
                    return miss
                return await _completed(events, response.aiter_text(), report)
        except (httpx.HTTPError, _TooLong):
            return StreamMiss.BROKEN

    async def _follow_plain(
        self,
        client: UpstreamClient,
        url: str,
        origin: tuple[str, str, int],
        wire: list[tuple[str, str]],
        data: bytes,
        events: _Events,
        report: ProgressReporter | None,
    ) -> dict[str, Any] | StreamMiss:
        if client._state == ClientState.CLOSED:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        client._state = ClientState.OPENED
        transport = client._transport
        assert isinstance(transport, WireTransport)  # a plain path needs it
        pool = transport.pool()
        try:
            answer = await pool.request(pool.origin(*origin), data, _TIMEOUTS, whole=False, idempotent=True)
        except WireError:
            return StreamMiss.BROKEN
        try:
            if _httpx_log.isEnabledFor(logging.INFO):
                _httpx_log.info('HTTP Request: %s %s "%s %d %s"', "GET", httpx.URL(url), "HTTP/1.1", answer.status,
                                answer.reason)
            ctype = (answer.header(b"content-type") or b"").decode("latin-1")
            miss = self._miss(answer.status, ctype)
            if miss is not None:
                return miss
            encoding = client._default_encoding
            if answer.header(b"content-encoding") is not None or "charset" in ctype.lower() or not isinstance(
                encoding, str
            ):
                # httpx decodes these (a compressed body, a declared charset) as on its own path
                request = httpx.Request("GET", url, headers=wire)
                response = httpx.Response(
                    answer.status, headers=answer.raw_headers, stream=WireBody(answer, request),
                    extensions=response_extensions(answer.reason), default_encoding=encoding, request=request,
                )
                return await _completed(events, response.aiter_text(), report)
            text = codecs.getincrementaldecoder(encoding)(errors="replace")
            lines = _Lines()
            async for chunk in answer.chunks():
                decoded = text.decode(chunk)
                if decoded:
                    event = await _first_completed(events, lines.decode(decoded), report)
                    if event is not None:
                        return event
            decoded = text.decode(b"", True)
            tail = [*(lines.decode(decoded) if decoded else ()), *lines.flush()]
            return await _first_completed(events, tail, report) or _at_end(events)
        except (WireError, OSError, httpx.HTTPError, _TooLong):
            return StreamMiss.BROKEN
        finally:
            answer.release()

    def _miss(self, status: int, ctype: str) -> StreamMiss | None:
        """UNSUPPORTED (remembered) or BROKEN for a response that is not a status stream."""
        if status in NO_STREAM_STATUSES or (status == 200 and not ctype.startswith("text/event-stream")):
            self._unsupported(f"HTTP {status} {ctype or 'without a content type'}")
            return StreamMiss.UNSUPPORTED
        if status != 200:
            return StreamMiss.BROKEN
        return None

    def _unsupported(self, why: str) -> None:
        if self.unsupported is None:
            self.unsupported = why
            log.warning("fal does not serve the status stream (%s); polling from now on", why)


async def _first_completed(
    events: _Events, lines: Iterable[str], report: ProgressReporter | None
) -> dict[str, Any] | None:
    """Each complete event of `lines` reported; the first COMPLETED one, if any."""
    for line in lines:
        event = events.line(line)
        if event is not None:
            if report is not None:
                await report(event)
            if event.get("status") == "COMPLETED":
                return event
    return None


async def _completed(
    events: _Events, texts: AsyncIterator[str], report: ProgressReporter | None
) -> dict[str, Any] | StreamMiss:
    """The lines of httpx's decoded text (`aiter_lines`, bounded), to the first COMPLETED event."""
    lines = _Lines()
    async for text in texts:
        event = await _first_completed(events, lines.decode(text), report)
        if event is not None:
            return event
    return await _first_completed(events, lines.flush(), report) or _at_end(events)


def _at_end(events: _Events) -> dict[str, Any] | StreamMiss:
    """A stream that ended: COMPLETED if its unterminated last event says so, else BROKEN."""
    event = events.end()
    if event is not None and event.get("status") == "COMPLETED":
        return event
    return StreamMiss.BROKEN
