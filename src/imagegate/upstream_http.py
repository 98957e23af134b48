"""The upstream HTTP client: httpx's API (what every adapter calls) on aiohttp's connection pool
and HTTP/1.1 parser.

Why not httpx's own transport: httpcore 1.0's `AsyncConnectionPool` re-scans every queued request
against every connection each time a request starts or ends, so its cost per request grows with
the number in flight; with ~1,500 fal jobs polling at once one gateway process spent all its CPU
there and completed nothing. Measured against the alternatives (bench/README.md, "Choosing the
upstream client"), aiohttp's connector costs O(1) per request at any K, and with its C parser an
upstream request costs about half the CPU of httpx + httpcore even at concurrency 1.

`AiohttpTransport` keeps httpx's contract for the adapters:

- httpx exceptions, mapped so that the distinctions the adapters rely on hold: `ConnectError` /
  `ConnectTimeout` only when no connection was made (a submit that failed so was never sent),
  `ReadTimeout` when the answer was late, `RemoteProtocolError` when the server hung up or
  answered garbage, `ReadError`/`WriteError` for socket errors on an open connection;
- httpx's per-request timeouts: `connect` (TCP + TLS), `read` (between bytes), `pool` (waiting
  for a free connection, plus the connect);
- bodies untouched (no decompression here, httpx decodes), no redirects (httpx follows them when
  asked), no cookies kept (neither here nor in the client's jar), no headers added beyond what
  httpx sends, URLs sent exactly as httpx encoded them, the `sni_hostname` extension (connect to
  an address, verify the name).

`limits.max_connections` applies per upstream host (one slow upstream cannot starve another); more
requests wait in aiohttp's FIFO queue. Idle connections close after `limits.keepalive_expiry`.
The aiohttp sessions (two on one connector: one told to skip the headers aiohttp would add, one
for requests whose headers already name them all, see `send`) are created on first use in the
running event loop (new ones if the loop changed, e.g. between tests). aiohttp timeouts are built
once per distinct value (`client_timeout`).

`upstream_client()` returns an `upstream_plain.UpstreamClient`: the adapters' plain calls (GET,
POST, PUT with headers, a JSON or bytes body, a timeout) skip httpx's request machinery and go to
`AiohttpTransport.send` directly, with the same request on the wire and the same errors.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import ssl
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import httpx
from multidict import CIMultiDict
from yarl import URL

__all__ = ["AiohttpTransport", "call_timeout", "client_timeout", "upstream_client"]

CHUNK = 64 * 1024
# Headers aiohttp would otherwise add on its own: httpx already sends the ones it means to.
_SKIP_AUTO = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


@contextmanager
def _mapped(request: httpx.Request) -> Iterator[None]:
    """aiohttp / socket failures -> the httpx exception httpcore would have raised."""
    try:
        yield
    except (aiohttp.ClientError, OSError) as exc:  # OSError: TimeoutError and socket errors too
        raise httpx_error(exc, request) from exc


def httpx_error(exc: aiohttp.ClientError | OSError, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception for an aiohttp or socket failure (what httpcore raises in that case)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(exc) or "Timed out connecting", request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):  # DNS, refused, TLS handshake: nothing was sent
        return httpx.ConnectError(str(exc), request=request)
    if isinstance(exc, aiohttp.SocketTimeoutError | aiohttp.ServerTimeoutError | TimeoutError):
        return httpx.ReadTimeout(str(exc) or "Timed out reading the response", request=request)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError("Server disconnected without sending a complete response.", request=request)
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(str(exc), request=request)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(str(exc), request=request)
    if isinstance(exc, aiohttp.ClientOSError | OSError):
        return httpx.ReadError(str(exc) or type(exc).__name__, request=request)
    return httpx.TransportError(str(exc) or type(exc).__name__, request=request)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped(self._request):
            async for chunk in self._response.content.iter_chunked(CHUNK):
                yield chunk

    async def aclose(self) -> None:
        # Fully read: the connection goes back to the pool; otherwise it is closed.
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport on an `aiohttp.ClientSession` (module docstring). HTTP/1.1, no proxy."""

    def __init__(self, *, limits: httpx.Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        self._limits = limits
        self._ssl = ssl_context or httpx.create_ssl_context()  # httpx's CA bundle and settings
        self._session: aiohttp.ClientSession | None = None
        self._complete: aiohttp.ClientSession | None = None  # on the same connector: see `send`
        self._loop: asyncio.AbstractEventLoop | None = None

    def _session_here(self, complete: bool = False) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(
                limit=0,
                limit_per_host=self._limits.max_connections or 0,
                keepalive_timeout=self._limits.keepalive_expiry or 0,
                ssl=self._ssl,
                ttl_dns_cache=10,
            )
            options: dict[str, Any] = {
                "cookie_jar": aiohttp.DummyCookieJar(),
                "auto_decompress": False,
                "timeout": aiohttp.ClientTimeout(total=None),
                "max_line_size": 16 * 1024,  # h11's (httpcore's) limit for a header block line
                "max_field_size": 16 * 1024,
            }
            self._session = aiohttp.ClientSession(connector=connector, skip_auto_headers=_SKIP_AUTO, **options)
            self._complete = aiohttp.ClientSession(connector=connector, connector_owner=False, **options)
            self._loop = loop
        if complete:
            assert self._complete is not None
            return self._complete
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        headers: CIMultiDict[str] = CIMultiDict()
        for key, value in request.headers.raw:
            headers.add(key.decode("latin-1"), value.decode("latin-1"))
        data: Any
        try:
            data = request.content or None
        except httpx.RequestNotRead:
            data = request.stream  # a streamed body: aiohttp sends it chunked
            headers.popall("transfer-encoding", None)
        timeouts = request.extensions.get("timeout", {})
        with _mapped(request):
            response = await self.send(
                request.method,
                str(request.url),
                headers,
                data,
                client_timeout(timeouts.get("pool"), timeouts.get("connect"), timeouts.get("read")),
                server_hostname=request.extensions.get("sni_hostname"),
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response, request),
            extensions=response_extensions(response.reason),
        )

    def send(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str] | list[tuple[str, str]],
        data: Any,
        timeout: aiohttp.ClientTimeout,
        *,
        server_hostname: str | None = None,
        complete: bool = False,
    ) -> Awaitable[aiohttp.ClientResponse]:
        """One request on the session, to await: the response with its head read. `url` is sent
        exactly as given (already encoded); `timeout` from `client_timeout`. `complete`: `headers`
        name every header aiohttp would otherwise add (Accept, Accept-Encoding, User-Agent, and
        Content-Type when there is a body), so aiohttp's per-request work for the headers it must
        skip is left out: the request goes on a second session on the same connector, without
        `skip_auto_headers`, that adds nothing either."""
        return self._session_here(complete).request(
            method,
            URL(url, encoded=True),
            headers=headers,
            data=data,
            allow_redirects=False,
            timeout=timeout,
            server_hostname=server_hostname,
        )

    async def aclose(self) -> None:
        sessions, self._session, self._complete = (self._complete, self._session), None, None
        for session in sessions:  # the connector's owner last
            if session is not None and not session.closed and self._loop is asyncio.get_running_loop():
                await session.close()


_client_timeouts: dict[tuple[float | None, float | None, float | None], aiohttp.ClientTimeout] = {}
_reasons: dict[str, bytes] = {}
_CACHED = 64  # entries per cache; a full cache starts again (the working set is a handful)


# `aiohttp.ClientTimeout(...)` is a frozen attrs class whose constructor costs more than the rest of
# `client_timeout`; a call with a deadline-derived timeout builds a new one per call. When its fields
# are the five known here (no validators or converters), a new one is filled in through its slots:
# the same object the constructor makes (equal, same hash and repr).
_TIMEOUT_FIELDS = ("total", "connect", "sock_read", "sock_connect", "ceil_threshold")


def _timeout_setters() -> tuple[Any, ...] | None:
    """The slot setters of `ClientTimeout`'s fields (in `_TIMEOUT_FIELDS` order) and the default
    `ceil_threshold`, when a timeout filled in through them is what its constructor makes."""
    fields = getattr(aiohttp.ClientTimeout, "__attrs_attrs__", None)
    if (
        fields is None
        or tuple(field.name for field in fields) != _TIMEOUT_FIELDS
        or any(field.validator is not None or field.converter is not None for field in fields)
        or hasattr(aiohttp.ClientTimeout, "__attrs_post_init__")
    ):
        return None
    return (*(vars(aiohttp.ClientTimeout)[name].__set__ for name in _TIMEOUT_FIELDS), fields[-1].default)


_TIMEOUT_SETTERS = _timeout_setters()


def client_timeout(pool: float | None, connect: float | None, read: float | None) -> aiohttp.ClientTimeout:
    """aiohttp's timeout for httpx's `pool`, `connect` and `read` (module docstring); the same
    values give the same (immutable) object."""
    key = (pool, connect, read)
    try:
        return _client_timeouts[key]
    except KeyError:
        pass
    if _TIMEOUT_SETTERS is not None:
        set_total, set_connect, set_sock_read, set_sock_connect, set_ceil_threshold, ceil = _TIMEOUT_SETTERS
        timeout = object.__new__(aiohttp.ClientTimeout)
        set_total(timeout, None)
        set_connect(timeout, pool)
        set_sock_read(timeout, read)
        set_sock_connect(timeout, connect)
        set_ceil_threshold(timeout, ceil)
    else:
        timeout = aiohttp.ClientTimeout(total=None, connect=pool, sock_connect=connect, sock_read=read)
    if len(_client_timeouts) >= _CACHED:
        _client_timeouts.clear()
    _client_timeouts[key] = timeout
    return timeout


def call_timeout(seconds: float, *, connect: float) -> httpx.Timeout:
    """`httpx.Timeout(seconds, connect=connect)` without its constructor's dispatch on argument
    kinds (a deadline-derived timeout is a new one per upstream call): the same four values."""
    timeout = object.__new__(httpx.Timeout)
    timeout.connect = connect
    timeout.read = timeout.write = timeout.pool = seconds
    return timeout


def response_extensions(reason: str | None) -> dict[str, Any]:
    """httpx's response extensions for an aiohttp response's `reason`."""
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

    client = UpstreamClient(transport=AiohttpTransport(limits=limits), timeout=timeout, headers=headers)
    client._cookies = _NoCookies(_NoCookieJar())  # httpx wraps any store passed in into a plain one
    return client

