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
none free in time); `ReadTimedOut`, `WriteTimedOut`, `Disconnected` and `BadResponse` after
(`upstream_exchange`). A response head is bounded (`MAX_HEAD`), a body read whole too
(`MAX_BODY`); a streamed body is read as the consumer asks for it, the socket paused while
`HIGH_WATER` bytes wait. Each connection is an `upstream_conn.Connection`.

A response whose message is complete gives its connection back at once (when both sides keep it
alive); one left before its end closes its connection. A task cancelled during an exchange closes
that connection: nothing half-read is ever reused.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import AsyncIterable, Iterable
from typing import Any

from imagegate.core.deadline import within
from imagegate.upstream_conn import FOREVER, Connection
from imagegate.upstream_exchange import (
    HIGH_WATER,
    MAX_BODY,
    MAX_HEAD,
    BadResponse,
    ConnectFailed,
    ConnectTimedOut,
    Disconnected,
    ReadTimedOut,
    StaleConnection,
    Timeouts,
    WireError,
    WireResponse,
    WriteTimedOut,
)

__all__ = [
    "HIGH_WATER", "IDEMPOTENT", "MAX_BODY", "MAX_HEAD", "BadResponse", "ConnectFailed", "ConnectTimedOut",
    "Disconnected", "ReadTimedOut", "StaleConnection", "Timeouts", "WireError", "WirePool", "WireResponse",
    "WriteTimedOut",
]

DNS_TTL = 10.0
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})  # RFC 9110 9.2.2
_Addresses = list[tuple[int, Any]]  # (family, sockaddr)


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
        self.idle: collections.deque[Connection] = collections.deque()
        self.open = 0  # connections holding a slot (idle, busy or connecting)
        self.waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self.sweeping = False
        self.closed = False

    async def acquire(self, timeouts: Timeouts, fresh: bool = False) -> Connection:
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

    async def _wait(self, timeout: float | None) -> Connection | None:
        """Queue for a connection released (returned) or a slot freed (None: connect in it)."""
        waiter: asyncio.Future[Connection | None] = self.loop.create_future()
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

    async def _connect(self, timeout: float | None) -> Connection:
        """A new connection in the slot the caller holds."""
        loop = self.loop
        addresses = await self.pool.resolve(self.host, self.port, timeout)
        last: OSError | None = None
        for family, address in addresses:
            conn = Connection(self)
            conn.counted = False  # the slot is the caller's until the connection is made
            try:
                with within(timeout if timeout is not None else FOREVER):
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

    def release(self, conn: Connection) -> None:
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

    def forget(self, conn: Connection) -> None:
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
