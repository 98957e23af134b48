"""A candidate measured by bench/clients.py, not used by the gateway: httpx over a connection pool
whose cost per request does not grow with the number of requests in flight.

httpcore 1.0's `AsyncConnectionPool` re-scans every queued request against every connection each
time a request starts or ends, so its cost per request grows with the number in flight: with
~1,500 jobs polling at once one gateway process spent all its CPU there and completed nothing
(bench/README.md, "In flight"). `FlatConnectionPool` keeps httpcore's HTTP/1.1 connections
(`httpcore.AsyncHTTPConnection`: the same protocol code, timeouts and exceptions, so the adapters
see exactly the httpx exceptions they saw before) and replaces only the bookkeeping. Per origin
(scheme, host, port):

- a stack of idle keep-alive connections: the most recently used is reused first, so the surplus
  ages out after `keepalive_expiry`; one that expired or that the server closed is dropped
  when it comes up;
- at most `max_connections` open connections (per origin: one busy upstream cannot starve another);
- a FIFO queue of the requests waiting for one of them, bounded in time by httpx's pool timeout.

Starting or finishing a request is O(1). `upstream_client()` builds the shared `httpx.AsyncClient`
on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpcore
import httpx

__all__ = ["FlatConnectionPool", "UpstreamTransport", "upstream_client"]


class _Origin:
    """The connections of one origin: idle ones, how many are open, who waits for one."""

    __slots__ = ("idle", "open", "waiters")

    def __init__(self) -> None:
        self.idle: deque[httpcore.AsyncConnectionInterface] = deque()
        self.open = 0  # idle + busy + connecting
        # A waiter's future gets an idle connection, or None: "a slot is free, open a new one".
        self.waiters: deque[asyncio.Future[httpcore.AsyncConnectionInterface | None]] = deque()


class FlatConnectionPool(httpcore.AsyncConnectionPool):
    """An httpcore pool with O(1) bookkeeping per request (module docstring). HTTP/1.1, no proxy.
    `max_connections` is per origin; idle connections beyond `max_keepalive_connections` (per
    origin) are closed when they are released."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._origins: dict[tuple[bytes, bytes, int], _Origin] = {}  # (scheme, host, port)
        self._busy: set[httpcore.AsyncConnectionInterface] = set()
        self._closed = False

    @property
    def connections(self) -> list[httpcore.AsyncConnectionInterface]:
        return [*self._busy, *(c for slot in self._origins.values() for c in slot.idle)]

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        scheme = request.url.scheme.decode()
        if scheme not in ("http", "https"):
            raise httpcore.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{scheme}://'."
                if scheme
                else "Request URL is missing an 'http://' or 'https://' protocol."
            )
        if self._closed:
            raise RuntimeError("The connection pool was closed.")
        origin = request.url.origin
        key = (origin.scheme, origin.host, origin.port)
        slot = self._origins.get(key)
        if slot is None:
            slot = self._origins[key] = _Origin()
        pool_timeout = request.extensions.get("timeout", {}).get("pool")
        while True:
            connection = await self._acquire(slot, origin, pool_timeout)
            try:
                response = await connection.handle_async_request(request)
            except httpcore.ConnectionNotAvailable:  # taken or closed under us: try another one
                self._release(slot, connection)
                continue
            except BaseException:
                self._release(slot, connection)
                raise
            break
        return httpcore.Response(
            status=response.status,
            headers=response.headers,
            content=_PooledStream(response.stream, self, slot, connection),
            extensions=response.extensions,
        )

    async def _acquire(
        self, slot: _Origin, origin: httpcore.Origin, timeout: float | None
    ) -> httpcore.AsyncConnectionInterface:
        while slot.idle:
            connection = slot.idle.pop()
            if connection.has_expired() or not connection.is_available():
                slot.open -= 1
                await _close(connection)
                continue
            self._busy.add(connection)
            return connection
        if slot.open >= self._max_connections:
            waiter: asyncio.Future[httpcore.AsyncConnectionInterface | None] = (
                asyncio.get_running_loop().create_future()
            )
            slot.waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout):
                    handed = await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():  # handed over just as we gave up: pass it on
                    self._pass_on(slot, waiter.result())
                else:
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        slot.waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise httpcore.PoolTimeout("Timed out waiting for an upstream connection.") from None
                raise
            if handed is not None:
                self._busy.add(handed)
                return handed
            # else: the slot of a closed connection was handed over (`open` already counts it)
        else:
            slot.open += 1
        connection = self.create_connection(origin)
        self._busy.add(connection)
        return connection

    def _release(self, slot: _Origin, connection: httpcore.AsyncConnectionInterface) -> None:
        """A request is done with `connection` (its response closed, or it failed)."""
        self._busy.discard(connection)
        if self._closed or connection.is_closed() or not connection.is_idle():
            if not connection.is_closed():
                _close_later(connection)
            self._pass_on(slot, None)
            return
        self._pass_on(slot, connection)

    def _pass_on(self, slot: _Origin, connection: httpcore.AsyncConnectionInterface | None) -> None:
        """Give an idle `connection` (or, for None, the slot of one that closed) to the first
        live waiter; else keep the connection idle (or forget the slot)."""
        while slot.waiters:
            waiter = slot.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        if connection is None:
            slot.open -= 1
        elif len(slot.idle) >= self._max_keepalive_connections:
            slot.open -= 1
            _close_later(connection)
        else:
            slot.idle.append(connection)
            # The oldest idle connection is the likeliest to have expired: drop it now rather
            # than keep its socket open until the next burst (O(1): at most one per release).
            oldest = slot.idle[0]
            if oldest is not connection and oldest.has_expired():
                slot.idle.popleft()
                slot.open -= 1
                _close_later(oldest)

    async def aclose(self) -> None:
        self._closed = True
        connections = self.connections
        for slot in self._origins.values():
            slot.idle.clear()
            while slot.waiters:
                waiter = slot.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(RuntimeError("The connection pool was closed."))
        self._origins.clear()
        self._busy.clear()
        for connection in connections:
            await _close(connection)

    async def __aexit__(self, *args: Any) -> None:
        await self.aclose()


class _PooledStream:
    """A response body that gives its connection back to the pool when it is closed."""

    def __init__(
        self, stream: Any, pool: FlatConnectionPool, slot: _Origin, connection: httpcore.AsyncConnectionInterface
    ) -> None:
        self._stream = stream
        self._pool = pool
        self._slot = slot
        self._connection: httpcore.AsyncConnectionInterface | None = connection

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            if hasattr(self._stream, "aclose"):
                await self._stream.aclose()
        finally:
            self._pool._release(self._slot, connection)


_closing: set[asyncio.Task[None]] = set()


async def _close(connection: httpcore.AsyncConnectionInterface) -> None:
    with contextlib.suppress(Exception):
        await connection.aclose()


def _close_later(connection: httpcore.AsyncConnectionInterface) -> None:
    """Close without making the releasing request wait (closing a plain socket does not block)."""
    task = asyncio.get_running_loop().create_task(_close(connection))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


class UpstreamTransport(httpx.AsyncHTTPTransport):
    """httpx's HTTP transport (request/response mapping, httpcore -> httpx exceptions) on a
    `FlatConnectionPool`."""

    def __init__(self, *, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)  # builds httpcore's pool (no sockets yet): replaced below
        self._pool = FlatConnectionPool(
            ssl_context=self._pool._ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
        )


def upstream_client(
    *, limits: httpx.Limits, timeout: httpx.Timeout, headers: dict[str, str] | None = None
) -> httpx.AsyncClient:
    """The shared upstream client: `limits.max_connections` (and the keep-alive limit) apply per
    upstream origin."""
    return httpx.AsyncClient(transport=UpstreamTransport(limits=limits), timeout=timeout, headers=headers)
