"""The upstream client's plain path: `UpstreamClient` is httpx's `AsyncClient` on
`upstream_http.AiohttpTransport`, with the calls the adapters make on every job (a GET, POST or
PUT with headers, a JSON or bytes body and a timeout) sent straight to aiohttp.

httpx's client layer (URL parsing, `Request` objects, the auth/redirect/stream machinery,
`Response` streams) cost about twice aiohttp's own work per upstream call on the gateway's hot
path. The plain path sends the same request on the wire (the same header list in the same order,
the same body bytes, the URL exactly as given), returns the same `httpx.Response` (its body read
and decoded by httpx), raises the same httpx exceptions (`upstream_http._httpx_error`) and writes
the same `httpx` log line. It is taken only when that can be guaranteed: a URL that httpx would
send unchanged, no params, cookies, auth, hooks, mounts or followed redirects; everything else
goes through httpx's own path.
"""

from __future__ import annotations

import datetime
import json as jsonlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import httpx
from httpx._client import ClientState, UseClientDefault

from imagegate.upstream_http import AiohttpTransport, httpx_error, response_extensions

__all__ = ["UpstreamClient", "plain_netloc", "plain_origin"]


# URLs httpx sends exactly as written (its parser neither quotes nor normalizes anything in them):
# http(s), a lower-case host name or IPv4 address, an optional non-default port, a path, a query.
_PLAIN_URL = re.compile(
    r"(?P<scheme>https?)://(?P<netloc>(?P<host>[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)(?::(?P<port>[1-9][0-9]{0,4}))?)"
    r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*(?:\?[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]*)?"
)
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DOT_SEGMENT = re.compile(r"/\.\.?(?:[/?]|\Z)")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_httpx_log = logging.getLogger("httpx")


def _plain(url: str) -> re.Match[str] | None:
    match = _PLAIN_URL.fullmatch(url)
    if match is None or _BAD_ESCAPE.search(url) or _DOT_SEGMENT.search(url, match.end("netloc")):
        return None
    if match["port"] is not None and (match["port"] == _DEFAULT_PORTS[match["scheme"]] or int(match["port"]) > 65535):
        return None
    return match


def plain_netloc(url: str) -> str | None:
    """The `Host` of a URL httpx would send unchanged; None for any other URL."""
    match = _plain(url)
    return None if match is None else match["netloc"]


def plain_origin(url: str) -> tuple[str, str, int | None] | None:
    """`(scheme, host, port)` as `httpx.URL(url)` has them, for a URL httpx would send unchanged
    (a cheap parse for the hot path); None for any other URL."""
    match = _plain(url)
    if match is None:
        return None
    return match["scheme"], match["host"], None if match["port"] is None else int(match["port"])


class _PlainResponse(httpx.Response):
    """A response of the plain path: its `request` (an httpx.Request) is built only if asked for."""

    _build_request: Callable[[], httpx.Request] | None = None

    @property
    def request(self) -> httpx.Request:
        if self._request is None and self._build_request is not None:
            self._request = self._build_request()
        return super().request

    @request.setter
    def request(self, value: httpx.Request) -> None:
        self._request = value

    def raise_for_status(self) -> httpx.Response:
        _ = self.request
        return super().raise_for_status()


class UpstreamClient(httpx.AsyncClient):
    """httpx's client on `AiohttpTransport`. A plain call (`get`/`post`/`put`/... with at most
    headers, a JSON or bytes body and a timeout, to a URL httpx sends unchanged) goes straight to
    aiohttp: the same request on the wire, the same `httpx.Response` (body read, decoded by httpx),
    the same httpx exceptions, the same `httpx` log line; without httpx's request, auth, redirect
    and stream machinery, which cost more CPU than aiohttp's own work. Anything else (streams,
    params, redirects followed, auth, hooks, mounts) takes httpx's ordinary path."""

    async def request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        content: Any = None,
        data: Any = None,
        files: Any = None,
        json: Any = None,
        params: Any = None,
        headers: Any = None,
        cookies: Any = None,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
        timeout: Any = httpx.USE_CLIENT_DEFAULT,
        extensions: Any = None,
    ) -> httpx.Response:
        transport = self._transport
        netloc = plain_netloc(url) if isinstance(url, str) else None
        if (
            netloc is None
            or not isinstance(transport, AiohttpTransport)
            or data is not None
            or files is not None
            or params is not None
            or cookies is not None
            or extensions is not None
            or (content is not None and (json is not None or not isinstance(content, bytes)))
            or not isinstance(auth, UseClientDefault)
            or self._auth is not None
            or not (follow_redirects is False or (isinstance(follow_redirects, UseClientDefault)
                                                  and not self.follow_redirects))
            or self._mounts
            or self._base_url.raw_path != b"/"
            or self._event_hooks["request"]
            or self._event_hooks["response"]
            or not _plain_headers(headers)
        ):
            return await super().request(
                method, url, content=content, data=data, files=files, json=json, params=params, headers=headers,
                cookies=cookies, auth=auth, follow_redirects=follow_redirects, timeout=timeout, extensions=extensions,
            )
        assert isinstance(url, str)
        return await self._plain(transport, method.upper(), url, netloc, content, json, headers, timeout)

    async def _plain(
        self,
        transport: AiohttpTransport,
        method: str,
        url: str,
        netloc: str,
        content: bytes | None,
        json: Any,
        headers: Mapping[str, str] | None,
        timeout: Any,
    ) -> httpx.Response:
        if self._state == ClientState.CLOSED:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        self._state = ClientState.OPENED
        timeouts = (self.timeout if isinstance(timeout, UseClientDefault) else httpx.Timeout(timeout)).as_dict()
        body: bytes | None = None
        body_headers: dict[str, str] = {}
        if content is not None:
            body = content
            body_headers = {"Content-Length": str(len(body))} if body else {}
        elif json is not None:  # as httpx encodes it
            body = jsonlib.dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
            body_headers = {"Content-Length": str(len(body)), "Content-Type": "application/json"}
        wire = _wire_headers(self._client_headers(), headers, body_headers, method, netloc)

        def build_request() -> httpx.Request:  # for an exception or a caller that asks for it
            return httpx.Request(
                method, url, headers=wire, stream=httpx.ByteStream(body or b""), extensions={"timeout": timeouts}
            )

        started = time.perf_counter()
        try:
            answer = await transport.send(method, url, wire, body or None, timeouts)
            try:
                raw = await answer.read()
            except BaseException:
                answer.close()
                raise
        except (aiohttp.ClientError, OSError) as exc:
            raise httpx_error(exc, build_request()) from exc
        response = _PlainResponse(
            answer.status,
            headers=answer.raw_headers,
            stream=httpx.ByteStream(raw),
            extensions=response_extensions(answer),
            default_encoding=self._default_encoding,
        )
        response._build_request = build_request
        if "content-encoding" in response.headers:
            response._request = build_request()  # a decoding error names its request, as httpx's does
            response.read()  # httpx decodes the body, as on its own path
        else:  # the state `read()` leaves, without running the identity decoder over the bytes
            response._content = raw
            response._num_bytes_downloaded = len(raw)
            response.is_stream_consumed = True
            response.is_closed = True
        response.elapsed = datetime.timedelta(seconds=time.perf_counter() - started)
        if _httpx_log.isEnabledFor(logging.INFO):
            _httpx_log.info(
                'HTTP Request: %s %s "%s %d %s"', method, httpx.URL(url), response.http_version,
                response.status_code, response.reason_phrase,
            )
        return response

    def _client_headers(self) -> list[tuple[str, str]]:
        """The client's own headers as str pairs (decoded again only when they changed)."""
        raw = tuple(self._headers.raw)
        cached = self.__dict__.get("_plain_cache")
        if cached is None or cached[0] != raw:
            cached = (raw, [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw])
            self.__dict__["_plain_cache"] = cached
        return cached[1]


def _plain_headers(headers: Any) -> bool:
    """None, or a dict of ASCII str names and values (what httpx encodes as ASCII)."""
    if headers is None:
        return True
    if type(headers) is not dict:
        return False
    return all(type(k) is str and type(v) is str and k.isascii() and v.isascii() for k, v in headers.items())


def _wire_headers(
    client: list[tuple[str, str]],
    extra: Mapping[str, str] | None,
    body: Mapping[str, str],
    method: str,
    netloc: str,
) -> list[tuple[str, str]]:
    """The header list httpx builds: the client's headers with the call's replacing same-named ones
    (appended in the call's order), the body's defaults where not set, then `Host` and, for a
    bodiless POST/PUT/PATCH, `Content-Length: 0` in front."""
    if extra:
        names = {name.lower() for name in extra}
        merged = [pair for pair in client if pair[0].lower() not in names]
        merged.extend(extra.items())
    else:
        merged = list(client)
    present = {name.lower() for name, _ in merged}
    for name, value in body.items():
        if name.lower() not in present:
            merged.append((name, value))
            present.add(name.lower())
    front = [] if "host" in present else [("Host", netloc)]
    if method in _BODY_METHODS and "content-length" not in present and "transfer-encoding" not in present:
        front.append(("Content-Length", "0"))
    return front + merged
