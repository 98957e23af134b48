"""One upstream exchange as the pool's callers see it: the failures (`WireError`s, each saying how
far the request got), the timeouts, and the response (`WireResponse`: its head, then its body read
whole or as it arrives). The connection that fills a response is `upstream_conn.Connection`; the
pool is `upstream_wire`.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagegate.upstream_conn import Connection

__all__ = [
    "HIGH_WATER", "MAX_BODY", "MAX_HEAD", "BadResponse", "ConnectFailed", "ConnectTimedOut", "Disconnected",
    "ReadTimedOut", "StaleConnection", "Timeouts", "WireError", "WireResponse", "WriteTimedOut",
]

MAX_HEAD = 64 * 1024  # status line and headers of one response
MAX_BODY = 256 * 1024 * 1024  # a body read whole (`WireResponse.read`)
HIGH_WATER = 256 * 1024  # streamed body bytes buffered before the socket is paused


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

    def __init__(self, conn: Connection, whole: bool) -> None:
        self._conn: Connection | None = conn
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
