"""One keep-alive HTTP/1.1 connection to an upstream (`Connection`): an asyncio protocol that writes a
request as given and parses its answer with llhttp (`httptools`) into a `WireResponse`, one
exchange at a time, with the read timeout, the bounds and the flow control of
`upstream_exchange`. Its pool (`upstream_wire._Origin`) hands it out and takes it back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Iterable
from typing import TYPE_CHECKING, cast

import httptools

from imagegate.core.deadline import within
from imagegate.upstream_exchange import (
    HIGH_WATER,
    MAX_BODY,
    MAX_HEAD,
    BadResponse,
    Disconnected,
    ReadTimedOut,
    StaleConnection,
    WireError,
    WireResponse,
    WriteTimedOut,
)

if TYPE_CHECKING:
    from imagegate.upstream_wire import _Origin

__all__ = ["FOREVER", "Connection"]

FOREVER = 10.0 * 365 * 86400  # a timeout that never comes (`within` needs one)


class Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    __slots__ = (
        "alive", "answered", "counted", "drain", "expect_body_until_eof", "head_bytes", "head_done", "head_only",
        "head_waiter", "idle_since", "last_read", "loop", "origin", "parser", "read_timeout", "reading_paused",
        "response", "reused", "sent", "timer", "transport", "writing_paused",
    )

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.loop = origin.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.alive = True  # not closed by either side
        self.reused = False  # served an exchange before this one
        self.answered = False  # bytes of this exchange's answer came
        self.sent = False  # this exchange's request is all written
        self.counted = True  # holds one of its origin's `limit` slots
        self.response: WireResponse | None = None
        self.head_waiter: asyncio.Future[WireResponse] | None = None
        self.head_done = False
        self.head_only = False  # a HEAD request: no body follows the head
        self.head_bytes = 0
        self.expect_body_until_eof = False
        self.idle_since = 0.0
        self.last_read = 0.0
        self.read_timeout: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.reading_paused = False
        self.writing_paused = False
        self.drain: asyncio.Future[None] | None = None

    def itself(self) -> Connection:
        """The protocol factory of its own connection."""
        return self

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not subclasses)

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for (on an idle connection): it cannot be reused
            self.abort()
            return
        self.answered = True
        if self.read_timeout is not None:
            self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # a 101 (any other upgrade fails in on_headers_complete)
            self._failed(BadResponse("unexpected protocol upgrade"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                return
            self._failed(cause if isinstance(cause, WireError) else BadResponse(f"invalid HTTP response: {exc}"))
            return
        if not self.head_done and self.response is not None:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self._failed(BadResponse(f"response head longer than {MAX_HEAD} bytes"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self._stop_timer()
        drain = self.drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self.response is not None:
            response = self.response
            if self.head_done and self.expect_body_until_eof and response._error is None and exc is None:
                self._complete()  # a body delimited by the end of the connection (not by a reset)
            elif self.reused and not self.answered:
                self._failed(StaleConnection("Server disconnected without sending a response."))
            else:
                self._failed(Disconnected("Server disconnected without sending a complete response."))
        self.origin.forget(self)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        drain = self.drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- httptools callbacks --

    def on_status(self, status: bytes) -> None:
        response = self.response
        if response is None:  # a second answer after the one asked for: the connection is not reused
            raise BadResponse("bytes after the response")
        response.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        if response is None:
            raise BadResponse("bytes after the response")
        response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # informational: the real answer follows
            response.raw_headers = []
            return
        if self.parser.should_upgrade():
            raise BadResponse("unexpected protocol upgrade")
        response.status = status
        self.head_done = True
        if self.head_only:  # no body follows, which the parser cannot be told: complete, not reused
            self._complete()
            raise _Stop
        framed = any(key.lower() in (b"content-length", b"transfer-encoding") for key, _ in response.raw_headers)
        self.expect_body_until_eof = not framed and status not in (204, 304)
        if not response._whole:
            self._head_arrived(response)

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        response._chunks.append(body)
        response._buffered += len(body)
        if response._whole:
            if response._buffered > MAX_BODY:
                raise BadResponse(f"response body larger than {MAX_BODY} bytes")
        else:
            if response._buffered > HIGH_WATER and not self.reading_paused and self.transport is not None:
                self.reading_paused = True
                self.transport.pause_reading()
            response._wake()

    def on_message_complete(self) -> None:
        """The answer is complete. The parser goes on to a next message, as llhttp does on a kept-
        alive connection (not by raising: an exception per answer would leave a reference cycle of
        its traceback's frames per upstream request for the collector); bytes of an answer nobody
        asked for then fail in `on_status` and the connection is closed."""
        if self.response is None or not self.head_done:  # the end of an informational response
            return
        self._complete()

    # -- the exchange --

    def begin(self, whole: bool, head_only: bool) -> tuple[asyncio.Future[WireResponse], WireResponse]:
        """A new exchange: the future of its response (complete if `whole`, else its head), and
        that response."""
        response = self.response = WireResponse(self, whole)
        self.answered = False
        self.sent = False
        self.head_done = False
        self.head_only = head_only
        self.head_bytes = 0
        self.expect_body_until_eof = False
        waiter = self.head_waiter = self.loop.create_future()
        return waiter, response

    def send(self, data: bytes, read_timeout: float | None) -> None:
        """Write the whole request; the read timeout runs from now."""
        assert self.transport is not None
        self.transport.write(data)
        self.sent = True
        self.arm_read_timeout(read_timeout)

    async def send_stream(
        self, head: bytes, body: AsyncIterable[bytes] | Iterable[bytes], chunked: bool, write_timeout: float | None
    ) -> None:
        """The head, then a streamed body (chunked when the headers say so): for httpx's path. It
        stops when the connection closes (the exchange's response, or its error, says how it ended:
        a server may answer before the body is all sent, and then the connection is not reused)."""
        transport = self.transport
        assert transport is not None
        transport.write(head)
        if isinstance(body, AsyncIterable):
            async for chunk in body:
                if not await self._write(chunk, chunked, write_timeout):
                    return
        else:
            for chunk in body:
                if not await self._write(chunk, chunked, write_timeout):
                    return
        if not self.alive:
            return
        if chunked:
            transport.write(b"0\r\n\r\n")
        self.sent = True

    async def _write(self, chunk: bytes, chunked: bool, timeout: float | None) -> bool:
        """Write one piece of the body (waiting at most `timeout` for the socket to take the
        buffered bytes); False once the connection is closed."""
        if not self.alive:
            return False
        if not chunk:
            return True
        assert self.transport is not None
        self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if self.writing_paused:
            self.drain = self.loop.create_future()
            try:
                with within(timeout if timeout is not None else FOREVER):
                    await self.drain
            except TimeoutError:
                raise WriteTimedOut("Timed out writing the request body") from None
            finally:
                self.drain = None
        return True

    def arm_read_timeout(self, read_timeout: float | None) -> None:
        """Start the read timeout: the request is written."""
        self.read_timeout = read_timeout
        if read_timeout is not None:
            self.last_read = now = self.loop.time()
            self.timer = self.loop.call_at(now + read_timeout, self._check_timeout)

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and self.alive:
            self.reading_paused = False
            self.last_read = self.loop.time()
            self.transport.resume_reading()

    def abort(self) -> None:
        """Close now (mid-exchange or unusable): never reused."""
        if self.alive:
            self.alive = False
            if self.transport is not None:
                self.transport.abort()
        self._stop_timer()
        self.origin.forget(self)

    def _head_arrived(self, response: WireResponse) -> None:
        waiter = self.head_waiter
        self.head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _complete(self) -> None:
        response = self.response
        assert response is not None
        self.response = None
        self._stop_timer()
        response._done = True
        response._conn = None
        reusable = (
            self.alive and self.sent and not self.expect_body_until_eof and not self.head_only
            and self.parser.should_keep_alive()
        )  # (an answer that came before the request's body was all sent: the connection is not reused)
        if reusable and self.reading_paused:  # the body's last bytes filled the buffer: the next exchange reads
            self.reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        self._head_arrived(response)
        response._wake()
        if reusable:
            self.origin.release(self)
        else:
            self.abort()

    def _failed(self, error: WireError) -> None:
        response = self.response
        self.response = None
        waiter = self.head_waiter
        self.head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if response is not None:
            response._fail(error)
        self.abort()

    def _check_timeout(self) -> None:
        self.timer = None
        if self.response is None or self.read_timeout is None:
            return
        due = self.last_read + self.read_timeout
        if self.reading_paused or self.loop.time() < due:  # bytes came meanwhile (or the reader is slow)
            self.timer = self.loop.call_at(
                self.loop.time() + self.read_timeout if self.reading_paused else due, self._check_timeout
            )
            return
        self._failed(ReadTimedOut("Timed out reading the response"))

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Stop(Exception):
    """Raised from a parser callback to stop parsing the rest of the bytes fed."""
