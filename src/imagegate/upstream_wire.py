"""HTTP/1.1 to the upstreams: keep-alive connections pooled per origin, each an asyncio protocol whose
responses llhttp parses (`httptools`, the parser uvicorn serves the gateway's own requests with).

`upstream_http.WireTransport` puts httpx's API on it; the plain calls of `upstream_plain` and fal's
status stream use it directly. A request is written exactly as given (the header list in its order,
the body as framed by the caller); nothing is added, nothing is decoded (httpx decodes bodies).

Per origin (`scheme://host:port`, and the TLS name when it differs):

- at most `limit` connections, idle or busy; more requests wait in a FIFO queue, each handed the
  next connection released (or the slot of one closed);
- idle connections are reused newest first, at most `max_idle` of them are kept, and one idle for
  longer than `keepalive` seconds (or closed by the server meanwhile) is closed, not reused;
- host names are resolved once per `DNS_TTL` seconds; addresses are tried in order.

Failures are `WireError`s that say how far the request got (`upstream_http.httpx_error` maps them
to httpx's): `ConnectFailed` and `ConnectTimedOut` before anything was written (no connection, or
none free in time); `ReadTimedOut`, `WriteTimedOut`, `Disconnected` and `BadResponse` after. A response head is
bounded (`MAX_HEAD`), a body read whole too (`MAX_BODY`); a streamed body is read as the consumer
asks for it, the socket paused while `HIGH_WATER` bytes wait.

A response whose message is complete gives its connection back at once (when both sides keep it
alive); one left before its end closes its connection. A task cancelled during an exchange closes
that connection: nothing half-read is ever reused.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any, cast

import httptools

from imagegate.core.deadline import within

__all__ = [
    "IDEMPOTENT", "MAX_BODY", "MAX_HEAD", "BadResponse", "ConnectFailed", "ConnectTimedOut", "Disconnected",
    "ReadTimedOut", "StaleConnection", "Timeouts", "WireError", "WirePool", "WireResponse", "WriteTimedOut",
]

MAX_HEAD = 64 * 1024  # status line and headers of one response
MAX_BODY = 256 * 1024 * 1024  # a body read whole (`WireResponse.read`)
HIGH_WATER = 256 * 1024  # streamed body bytes buffered before the socket is paused
DNS_TTL = 10.0
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})  # RFC 9110 9.2.2
_Addresses = list[tuple[int, Any]]  # (family, sockaddr)
_FOREVER = 10.0 * 365 * 86400


class WireError(Exception):
    """A request that failed on the way; the subclass says how far it got."""


class ConnectFailed(WireError):
    """No connection (name resolution, refused, TLS handshake): nothing was sent."""


class ConnectTimedOut(WireError):
    """No connection, or no free one, in time: nothing was sent."""


class ReadTimedOut(WireError):
    """The request went out; the answer (or its next bytes) did not come in time."""


class WriteTimedOut(WireError):
    """A streamed request body could not be written in time (the server does not read it)."""


class Disconnected(WireError):
    """The connection closed before the response was complete."""


class StaleConnection(Disconnected):
    """A kept-alive connection that the server had closed: it closed before any byte of the answer.
    An idempotent request is sent again on a new connection (`WirePool.request`)."""


class BadResponse(WireError):
    """The response was not HTTP/1.1 as it must be (or over a bound)."""


class Timeouts:
    """Seconds (None: no limit): `pool` to wait for a free connection, `connect` to open one,
    `read` between the request's end and any next bytes of its answer, `write` for the socket to
    take more of a streamed request body."""

    __slots__ = ("connect", "pool", "read", "write")

    def __init__(
        self, pool: float | None, connect: float | None, read: float | None, write: float | None = None
    ) -> None:
        self.pool, self.connect, self.read, self.write = pool, connect, read, write


class WireResponse:
    """A response whose head has arrived: `status`, `reason`, `raw_headers` (name/value bytes as
    received); the body through `read()` or `chunks()`, then `release()`."""

    __slots__ = (
        "_buffered", "_chunks", "_conn", "_done", "_error", "_waiter", "_whole", "raw_headers", "reason", "status",
    )

    def __init__(self, conn: _Conn, whole: bool) -> None:
        self._conn: _Conn | None = conn
        self._whole = whole  # the body is kept until the end (read), not streamed (chunks)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._error: WireError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []

    def header(self, name: bytes) -> bytes | None:
        """The values of header `name` (lower case) joined by ", ", or None."""
        values = [value for key, value in self.raw_headers if key.lower() == name]
        return b", ".join(values) if values else None

    async def read(self) -> bytes:
        """The whole body (at most MAX_BODY bytes)."""
        while not self._done and self._error is None:
            await self._wait()
        if self._error is not None:
            raise self._error
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        chunks = self._chunks
        while True:
            while chunks:
                chunk = chunks.popleft()
                self._buffered -= len(chunk)
                conn = self._conn
                if conn is not None and conn.reading_paused and self._buffered <= HIGH_WATER // 4:
                    conn.resume_reading()
                yield chunk
            if self._error is not None:
                raise self._error
            if self._done:
                return
            await self._wait()

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        except BaseException:
            self.release()  # abandoned mid-body: the connection cannot be reused
            raise
        finally:
            self._waiter = None

    def release(self) -> None:
        """Done with this response: its connection goes back to the pool if the message was
        complete (it already has), else it is closed."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._done:
            conn.abort()

    # -- from the connection --

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: WireError) -> None:
        if not self._done and self._error is None:
            self._error = error
            self._conn = None
            self._wake()


class _Conn(asyncio.Protocol):
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

    def itself(self) -> _Conn:
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
        assert self.response is not None
        self.response.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.raw_headers.append((name, value))

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
        response = self.response
        if response is None or not self.head_done:  # the end of an informational response
            return
        self._complete()
        raise _Stop  # bytes after the answer (none expected) are not parsed

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
                with within(timeout if timeout is not None else _FOREVER):
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
        if reusable:
            self.parser = httptools.HttpResponseParser(self)  # llhttp's state after a message: start afresh
            if self.reading_paused:  # the body's last bytes filled the buffer: the next exchange reads
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


class _Origin:
    """The connections to one origin. `idle` is oldest first; a connection that closed while idle
    stays in it until it is taken or swept (both skip it), so nothing is searched for."""

    __slots__ = ("closed", "host", "idle", "keepalive", "limit", "loop", "max_idle", "open", "pool", "port",
                 "server_hostname", "ssl", "sweeping", "waiters")

    def __init__(
        self, pool: WirePool, host: str, port: int, tls: ssl.SSLContext | None, server_hostname: str | None
    ) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.host, self.port, self.ssl, self.server_hostname = host, port, tls, server_hostname
        self.limit = pool.limit
        self.max_idle = pool.max_idle
        self.keepalive = pool.keepalive
        self.idle: collections.deque[_Conn] = collections.deque()
        self.open = 0  # connections holding a slot (idle, busy or connecting)
        self.waiters: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()
        self.sweeping = False
        self.closed = False

    async def acquire(self, timeouts: Timeouts, fresh: bool = False) -> _Conn:
        """A connection for one exchange: idle, handed over or new (only new if `fresh`)."""
        if self.closed:
            raise ConnectFailed("The client was closed.")
        idle = self.idle
        if idle and not fresh:
            oldest = self.loop.time() - self.keepalive
            while idle:
                conn = idle.pop()
                if conn.alive and conn.idle_since > oldest:
                    conn.reused = True
                    return conn
                conn.abort()
        if fresh and idle and self.limit and self.open >= self.limit:
            taken = idle.popleft()  # the oldest idle connection gives up its slot
            taken.counted = False
            taken.abort()
            self.open -= 1
        if self.limit and self.open >= self.limit:
            handed = await self._wait(timeouts.pool)
            if handed is not None and not handed.alive:
                # closed after it was handed over (before this task ran): its slot was freed then
                # (to the next waiter, or the count), so this caller asks again; nothing was written
                return await self.acquire(timeouts, fresh)
            if handed is not None:
                if not fresh:
                    return handed
                handed.counted = False  # its slot is this caller's now
                handed.abort()
        else:
            self.open += 1
        try:
            return await self._connect(timeouts.connect)
        except BaseException:
            self._free_slot()
            raise

    async def _wait(self, timeout: float | None) -> _Conn | None:
        """Queue for a connection released (returned) or a slot freed (None: connect in it)."""
        waiter: asyncio.Future[_Conn | None] = self.loop.create_future()
        self.waiters.append(waiter)
        expiry = None if timeout is None else _Expiry(self.loop, timeout, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed one just as the task was cancelled
                handed = waiter.result()
                if handed is None:
                    self._free_slot()
                else:
                    self.release(handed)
            elif expiry is not None and expiry.expired:
                raise ConnectTimedOut("Timed out waiting for a free connection") from None
            raise
        finally:
            if expiry is not None:
                expiry.handle.cancel()

    async def _connect(self, timeout: float | None) -> _Conn:
        """A new connection in the slot the caller holds."""
        loop = self.loop
        addresses = await self.pool.resolve(self.host, self.port, timeout)
        last: OSError | None = None
        for family, address in addresses:
            conn = _Conn(self)
            conn.counted = False  # the slot is the caller's until the connection is made
            try:
                with within(timeout if timeout is not None else _FOREVER):
                    await loop.create_connection(
                        conn.itself, address[0], address[1], family=family, ssl=self.ssl,
                        server_hostname=(self.server_hostname or self.host) if self.ssl is not None else None,
                    )
            except TimeoutError:
                raise ConnectTimedOut("Timed out connecting") from None
            except OSError as exc:  # refused, unreachable, TLS (ssl.SSLError is an OSError)
                last = exc
                continue
            if not conn.alive:  # closed by the server at once
                last = ConnectionResetError("Connection closed by the server")
                continue
            conn.counted = True
            return conn
        raise ConnectFailed(str(last) or type(last).__name__) from last

    def release(self, conn: _Conn) -> None:
        """A connection whose exchange is over, kept alive by both sides: to the first waiter, else
        idle (or closed, past `max_idle`)."""
        if self.closed:
            conn.abort()
            return
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                conn.reused = True
                waiter.set_result(conn)
                return
        idle = self.idle
        if len(idle) >= self.max_idle:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        idle.append(conn)
        if not self.sweeping:
            self.sweeping = True
            self.loop.call_at(conn.idle_since + self.keepalive, self._sweep)

    def forget(self, conn: _Conn) -> None:
        """A connection closed: its slot is free (once)."""
        if conn.counted:
            conn.counted = False
            self._free_slot()

    def _free_slot(self) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the waiter connects in this slot
                return
        self.open -= 1

    def _sweep(self) -> None:
        """Close the connections idle for `keepalive` seconds (and drop the closed ones before them)."""
        self.sweeping = False
        idle = self.idle
        oldest = self.loop.time() - self.keepalive
        while idle and (idle[0].idle_since <= oldest or not idle[0].alive):
            idle.popleft().abort()
        if idle:
            self.sweeping = True
            self.loop.call_at(idle[0].idle_since + self.keepalive, self._sweep)

    def close(self) -> None:
        self.closed = True
        while self.idle:
            self.idle.popleft().abort()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectFailed("The client was closed."))


class _Expiry:
    """The pool timeout of one waiter: cancels it, and says so."""

    __slots__ = ("expired", "handle", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, waiter: asyncio.Future[Any]) -> None:
        self.expired = False
        self.waiter = waiter
        self.handle = loop.call_later(timeout, self._fire)

    def _fire(self) -> None:
        if not self.waiter.done():
            self.expired = True
            self.waiter.cancel()


class WirePool:
    """The connections of one client on one event loop (`upstream_http.WireTransport` makes a new
    one when the loop changes)."""

    def __init__(self, *, limit: int, max_idle: int, keepalive: float, tls: ssl.SSLContext) -> None:
        self.loop = asyncio.get_running_loop()
        self.limit = limit  # per origin; 0: none
        self.max_idle = max_idle
        self.keepalive = keepalive
        self.tls = tls
        self.origins: dict[tuple[str, str, int, str | None], _Origin] = {}
        self.dns: dict[tuple[str, int], tuple[float, _Addresses]] = {}

    def origin(self, scheme: str, host: str, port: int, server_hostname: str | None = None) -> _Origin:
        key = (scheme, host, port, server_hostname)
        try:
            return self.origins[key]
        except KeyError:
            origin = self.origins[key] = _Origin(
                self, host, port, self.tls if scheme == "https" else None, server_hostname
            )
            return origin

    async def request(
        self,
        origin: _Origin,
        data: bytes,
        timeouts: Timeouts,
        *,
        whole: bool,
        head_only: bool = False,
        idempotent: bool = False,
    ) -> WireResponse:
        """Send one request (`data`: request line, headers, blank line and body as they go on the
        wire) and return its response: complete (`whole`) or with its head read. An `idempotent`
        request (GET, PUT, ...) whose kept-alive connection turns out closed by the server goes
        once more on a new connection; any other request is never sent twice."""
        fresh = False
        while True:
            conn = await origin.acquire(timeouts, fresh)
            waiter, response = conn.begin(whole, head_only)
            conn.send(data, timeouts.read)
            try:
                return await waiter
            except StaleConnection:
                if not idempotent or fresh:
                    raise
                fresh = True
            except asyncio.CancelledError:
                _abandon(waiter, response)
                raise

    async def request_stream(
        self,
        origin: _Origin,
        head: bytes,
        body: AsyncIterable[bytes] | Iterable[bytes],
        chunked: bool,
        timeouts: Timeouts,
        *,
        head_only: bool = False,
    ) -> WireResponse:
        """`request` with a body written as it is produced (chunked when `chunked`); the response
        with its head read."""
        conn = await origin.acquire(timeouts)
        waiter, response = conn.begin(False, head_only)
        try:
            await conn.send_stream(head, body, chunked, timeouts.write)
            if conn.response is response:  # the answer is not complete (its head may have come)
                conn.arm_read_timeout(timeouts.read)
            return await waiter
        except BaseException:
            _abandon(waiter, response)
            raise

    async def resolve(
        self, host: str, port: int, timeout: float | None
    ) -> _Addresses:
        """The addresses of `host` (cached DNS_TTL seconds); an IP address as it is."""
        key = (host, port)
        cached = self.dns.get(key)
        now = self.loop.time()
        if cached is not None and cached[0] > now:
            return cached[1]
        if len(self.dns) >= 256:
            self.dns.clear()
        if _is_ip(host):
            addresses: _Addresses = [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
            self.dns[key] = (float("inf"), addresses)
            return addresses
        try:
            infos = await asyncio.wait_for(
                self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), timeout
            )
        except TimeoutError:
            raise ConnectTimedOut(f"Timed out resolving {host}") from None
        except OSError as exc:
            raise ConnectFailed(f"Cannot resolve {host}: {exc}") from exc
        addresses = [(int(family), address) for family, _, _, _, address in infos]
        if not addresses:
            raise ConnectFailed(f"Cannot resolve {host}")
        self.dns[key] = (now + DNS_TTL, addresses)
        return addresses

    def close(self) -> None:
        for origin in self.origins.values():
            origin.close()
        self.origins.clear()


def _abandon(waiter: asyncio.Future[WireResponse], response: WireResponse) -> None:
    """The caller left an exchange (its task cancelled: `waiter` is then cancelled too): a connection
    still in it is closed; one whose response was complete is back in the pool already and is left
    alone (it may serve another exchange by now)."""
    if not waiter.done():
        waiter.cancel()  # (nobody awaits what the connection's end would set)
    elif not waiter.cancelled():
        waiter.exception()  # (retrieved)
    response.release()


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True
