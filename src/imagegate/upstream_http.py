"""The upstream HTTP client: httpx's API (what every adapter calls) on the gateway's own HTTP/1.1
connections (`upstream_wire`: asyncio protocols, llhttp's parser, a pool per upstream origin).

Why not httpx's own transport: httpcore 1.0's `AsyncConnectionPool` re-scans every queued request
against every connection each time a request starts or ends, so its cost per request grows with
the number in flight; with ~1,500 fal jobs polling at once one gateway process spent all its CPU
there and completed nothing. aiohttp's pool costs O(1) per request but about 100 us of CPU per
upstream request, and a job makes four: with 10,000 jobs in flight that alone was a quarter of the
gateway's one core. `upstream_wire` costs about a quarter of that (bench/README.md, "Choosing the
upstream client").

`WireTransport` keeps httpx's contract for the adapters:

- httpx exceptions, mapped so that the distinctions the adapters rely on hold: `ConnectError` /
  `ConnectTimeout` only when nothing was sent (no connection, or none free in time: a submit that
  failed so was never sent), `ReadTimeout` when the answer was late, `RemoteProtocolError` when
  the server hung up or answered garbage;
- httpx's per-request timeouts: `connect` (TCP + TLS), `read` (between bytes), `pool` (waiting
  for a free connection), `write` (a streamed request body: for the socket to take more);
- the request exactly as httpx built it (its header list, its body framing), bodies untouched
  (httpx decodes), no redirects (httpx follows them when asked), no cookies kept, the
  `sni_hostname` extension (connect to an address, verify the name).

`limits.max_connections` applies per upstream origin (one slow upstream cannot starve another);
more requests wait in a FIFO queue. At most `limits.max_keepalive_connections` idle connections
are kept per origin; idle connections close after `limits.keepalive_expiry`. The pool belongs to
the running event loop (a new one if the loop changed, e.g. between tests).

`upstream_client()` returns an `upstream_plain.UpstreamClient`: the adapters' plain calls (GET,
POST, PUT with headers, a JSON or bytes body, a timeout) skip httpx's request machinery and go to
the pool directly, with the same request on the wire and the same errors.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any, AnyStr

import httpx

from imagegate.upstream_wire import (
    IDEMPOTENT,
    BadResponse,
    ConnectFailed,
    ConnectTimedOut,
    Disconnected,
    ReadTimedOut,
    Timeouts,
    WireError,
    WirePool,
    WireResponse,
    WriteTimedOut,
)

__all__ = [
    "DECODE_SLICE", "DEFAULT_PORTS", "WireBody", "WireTransport", "bad_header", "call_timeout", "decode_slices",
    "host_first", "httpx_error", "timeouts", "upstream_client",
]

DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = frozenset({b"host", "host"})  # the header's name, lower case, as bytes (httpx's lists) or str
DECODE_SLICE = 4 * 1024  # encoded bytes handed to httpx's decoder at a time (deflate expands up to ~1,000x)
# What h11 (httpx's own transport) accepts in a request header: a token for a name, no CR, LF,
# NUL or other whitespace in a value but single spaces/tabs between its parts. Anything else
# would be written as is here (a CR LF in a value writes a header of its own): refused instead.
_HEADER_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_HEADER_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")


def bad_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The name of the first header h11 would refuse (its value is not quoted: it may be a
    credential); None when all are fine."""
    for name, value in headers:
        if _HEADER_NAME.fullmatch(name) is None or _HEADER_VALUE.fullmatch(value) is None:
            return name.decode("latin-1")
    return None


def host_first(headers: list[tuple[AnyStr, AnyStr]]) -> list[tuple[AnyStr, AnyStr]]:
    """The header list (of bytes or of str) in the order h11 (httpx's own transport) writes it:
    `Host` first."""
    if not headers or headers[0][0].lower() in _HOST or not any(k.lower() in _HOST for k, _ in headers):
        return headers
    return [p for p in headers if p[0].lower() in _HOST] + [p for p in headers if p[0].lower() not in _HOST]


def decode_slices(chunk: bytes) -> Iterator[bytes]:
    """`chunk` in pieces of at most DECODE_SLICE bytes: what one step of httpx's decoder is handed,
    so that it never expands more than one slice at once (a compression bomb stays bounded)."""
    if len(chunk) <= DECODE_SLICE:
        yield chunk
        return
    for start in range(0, len(chunk), DECODE_SLICE):
        yield chunk[start:start + DECODE_SLICE]


def refused_header(name: str, request: httpx.Request) -> httpx.LocalProtocolError:
    return httpx.LocalProtocolError(f"Illegal request header {name!r}", request=request)


def httpx_error(exc: WireError, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception for a failed request (what httpcore raises in that case)."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectTimedOut):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(exc, ConnectFailed):  # DNS, refused, TLS handshake: nothing was sent
        return httpx.ConnectError(message, request=request)
    if isinstance(exc, ReadTimedOut):
        return httpx.ReadTimeout(message, request=request)
    if isinstance(exc, WriteTimedOut):
        return httpx.WriteTimeout(message, request=request)
    if isinstance(exc, Disconnected | BadResponse):
        return httpx.RemoteProtocolError(message, request=request)
    return httpx.ReadError(message, request=request)


class WireBody(httpx.AsyncByteStream):
    """A response body from the pool as an httpx stream, its failures httpx's; an encoded one in
    `decode_slices` (a compression bomb stays bounded by what the caller reads)."""

    def __init__(self, response: WireResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request
        self._encoded = response.header(b"content-encoding") is not None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.chunks():
                if self._encoded:
                    for piece in decode_slices(chunk):
                        yield piece
                else:
                    yield chunk
        except WireError as exc:
            raise httpx_error(exc, self._request) from exc

    async def aclose(self) -> None:
        # Fully read: the connection is back in the pool already; otherwise it is closed.
        self._response.release()


class WireTransport(httpx.AsyncBaseTransport):
    """An httpx transport on `upstream_wire.WirePool` (module docstring). HTTP/1.1, no proxy."""

    def __init__(self, *, limits: httpx.Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        self._limits = limits
        self._ssl = ssl_context or httpx.create_ssl_context()  # httpx's CA bundle and settings
        self._pool: WirePool | None = None

    def pool(self) -> WirePool:
        """The pool of the running event loop."""
        pool = self._pool
        if pool is None or pool.loop is not asyncio.get_running_loop():
            limits = self._limits
            pool = self._pool = WirePool(
                limit=limits.max_connections or 0,
                max_idle=limits.max_keepalive_connections if limits.max_keepalive_connections is not None else 1 << 30,
                keepalive=limits.keepalive_expiry if limits.keepalive_expiry is not None else float("inf"),
                tls=self._ssl,
            )
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"Request URL has an unsupported protocol '{scheme}://'.", request=request)
        if not url.host:
            raise httpx.UnsupportedProtocol("Request URL is missing a host.", request=request)
        raw = request.headers.raw
        bad = bad_header(raw)
        if bad is not None:
            raise refused_header(bad, request)
        pool = self.pool()
        sni = request.extensions.get("sni_hostname")
        origin = pool.origin(scheme, url.host, url.port or DEFAULT_PORTS[scheme], sni)
        method = request.method.encode("ascii")
        head = b"".join(
            [method, b" ", url.raw_path, b" HTTP/1.1\r\n",
             *(b"%s: %s\r\n" % (key, value) for key, value in host_first(raw)), b"\r\n"]
        )
        limits = request.extensions.get("timeout", {})
        wait = Timeouts(limits.get("pool"), limits.get("connect"), limits.get("read"), limits.get("write"))
        head_only = method == b"HEAD"
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        try:
            try:
                if chunked:  # a body in hand is chunk-framed too, as h11 frames it
                    raise httpx.RequestNotRead()
                body = request.content
            except httpx.RequestNotRead:  # a streamed body, framed as its headers say
                stream = request.stream
                assert isinstance(stream, httpx.AsyncByteStream)
                response = await pool.request_stream(origin, head, stream, chunked, wait, head_only=head_only)
            else:
                response = await pool.request(
                    origin, head + body, wait, whole=False, head_only=head_only,
                    idempotent=request.method in IDEMPOTENT,
                )
        except WireError as exc:
            raise httpx_error(exc, request) from exc
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=WireBody(response, request),
            extensions=response_extensions(response.reason),
        )

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


_timeouts: dict[tuple[float | None, float | None, float | None], Timeouts] = {}
_reasons: dict[str, bytes] = {}
_CACHED = 64  # entries per cache; a full cache starts again (the working set is a handful)


def timeouts(pool: float | None, connect: float | None, read: float | None) -> Timeouts:
    """The pool's timeouts for httpx's `pool`, `connect` and `read`; the same values give the same
    (unchanged) object."""
    key = (pool, connect, read)
    try:
        return _timeouts[key]
    except KeyError:
        pass
    found = Timeouts(pool, connect, read)
    if len(_timeouts) >= _CACHED:
        _timeouts.clear()
    _timeouts[key] = found
    return found


def call_timeout(seconds: float, *, connect: float) -> httpx.Timeout:
    """`httpx.Timeout(seconds, connect=connect)` without its constructor's dispatch on argument
    kinds (a deadline-derived timeout is a new one per upstream call): the same four values."""
    timeout = object.__new__(httpx.Timeout)
    timeout.connect = connect
    timeout.read = timeout.write = timeout.pool = seconds
    return timeout


def response_extensions(reason: str | None) -> dict[str, Any]:
    """httpx's response extensions for a response's `reason`."""
    reason = reason or ""
    try:
        phrase = _reasons[reason]
    except KeyError:
        phrase = reason.encode("latin-1", "replace")
        if len(_reasons) >= _CACHED:
            _reasons.clear()
        _reasons[reason] = phrase
    return {"http_version": b"HTTP/1.1", "reason_phrase": phrase}


class _NoCookieJar(http.cookiejar.CookieJar):
    """A jar that keeps nothing: the shared client serves every user, so an upstream's cookie must
    never ride along on another request."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None


class _NoCookies(httpx.Cookies):
    """The client's cookie store: skips httpx's per-response cookie parsing (urllib request and
    response adapters built for every call, ~5 % of the gateway's CPU in a burst)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


def upstream_client(
    *, limits: httpx.Limits, timeout: httpx.Timeout, headers: dict[str, str] | None = None
) -> httpx.AsyncClient:
    """The shared upstream client (`limits.max_connections` per upstream host; no cookies kept)."""
    from imagegate.upstream_plain import UpstreamClient  # it builds on this module's transport

    client = UpstreamClient(transport=WireTransport(limits=limits), timeout=timeout, headers=headers)
    client._cookies = _NoCookies(_NoCookieJar())  # httpx wraps any store passed in into a plain one
    return client

