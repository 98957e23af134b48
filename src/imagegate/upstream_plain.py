"""The upstream client's plain path: `UpstreamClient` is httpx's `AsyncClient` on
`upstream_http.WireTransport`, with the calls the adapters make on every job (a GET, POST or
PUT with headers, a JSON or bytes body and a timeout) sent straight to its pool (`upstream_wire`).

httpx's client layer (URL parsing, `Request` objects, the auth/redirect/stream machinery,
`Response` streams) costs more than the pool's own work per upstream call on the gateway's hot
path. The plain path sends the same request on the wire (the same header list in the same order,
the same body bytes, the URL exactly as given), returns the same `httpx.Response` (its body read,
decoded by httpx when it is encoded), raises the same httpx exceptions (`upstream_http.httpx_error`)
and writes the same `httpx` log line. It is taken only when that can be guaranteed: a URL that
httpx would send unchanged, no params, cookies, auth, hooks, mounts or followed redirects;
everything else goes through httpx's own path.

What does not change from call to call is worked out once: whether an origin (`scheme://host:port`)
is plain, the header list a header set merges into (again when the client's headers change), the
pool's timeouts of an httpx timeout. What callers seldom read of a response (its `headers`,
`extensions`, `stream`, `request`, `elapsed`) is built on first use (`upstream_response`); most
adapter calls read only the status and the JSON body.
"""

from __future__ import annotations

import json as jsonlib
import logging
import re
import time
from typing import Any, NamedTuple

import httpx
from httpx._client import ClientState, UseClientDefault

from imagegate.upstream_http import (
    DEFAULT_PORTS,
    WireTransport,
    _NoCookies,
    bad_header,
    host_first,
    httpx_error,
    timeouts,
)
from imagegate.upstream_response import _PlainResponse, _Sent
from imagegate.upstream_wire import IDEMPOTENT, WireError

__all__ = ["UpstreamClient", "plain_netloc", "plain_origin"]


# URLs httpx sends exactly as written (its parser neither quotes nor normalizes anything in them):
# http(s), a lower-case host name or IPv4 address, an optional non-default port, a path, a query.
_PLAIN_ORIGIN = re.compile(
    r"(?P<scheme>https?)://(?P<netloc>(?P<host>[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)(?::(?P<port>[1-9][0-9]{0,4}))?)"
)
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*(?:\?[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]*)?")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")  # httpx quotes it
_DOT_SEGMENT = re.compile(r"/\.\.?(?:[/?]|\Z)")  # httpx removes it
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_CACHED = 256  # entries per cache below; a full cache starts again (the working set is a handful)
_httpx_log = logging.getLogger("httpx")
_JSON = jsonlib.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)  # httpx's json= encoding
_USE_DEFAULT = httpx.USE_CLIENT_DEFAULT


class _Origin(NamedTuple):
    netloc: str  # the `Host` httpx sends
    parsed: tuple[str, str, int | None]  # (scheme, host, port) as `httpx.URL` has them
    key: tuple[str, str, int]  # (scheme, host, port) the connection goes to
    path: int  # where the path starts in the URL (after the origin)


_origins: dict[str, _Origin | None] = {}


def _origin(prefix: str) -> _Origin | None:
    """The origin part of a URL (up to its path), if httpx sends it unchanged; cached."""
    try:
        return _origins[prefix]
    except KeyError:
        pass
    match = _PLAIN_ORIGIN.fullmatch(prefix)
    origin = None
    if match is not None and (
        match["port"] is None or (int(match["port"]) != DEFAULT_PORTS[match["scheme"]] and int(match["port"]) <= 65535)
    ):
        port = None if match["port"] is None else int(match["port"])
        scheme, host = match["scheme"], match["host"]
        origin = _Origin(
            match["netloc"], (scheme, host, port), (scheme, host, port or DEFAULT_PORTS[scheme]), len(prefix)
        )
    if len(_origins) >= _CACHED:
        _origins.clear()
    _origins[prefix] = origin
    return origin


def _plain(url: str) -> _Origin | None:
    path = url.find("/", 8)  # the first slash after `http://h` / `https://`: where the path starts
    if path < 0:
        return None
    origin = _origin(url[:path])
    if (
        origin is None
        or _PLAIN_PATH.fullmatch(url, path) is None
        or ("%" in url and _BAD_ESCAPE.search(url, path) is not None)
        or ("/." in url and _DOT_SEGMENT.search(url, path) is not None)
    ):
        return None
    return origin


def plain_netloc(url: str) -> str | None:
    """The `Host` of a URL httpx would send unchanged; None for any other URL."""
    origin = _plain(url)
    return None if origin is None else origin.netloc


def plain_origin(url: str) -> tuple[str, str, int | None] | None:
    """`(scheme, host, port)` as `httpx.URL(url)` has them, for a URL httpx would send unchanged
    (a cheap parse for the hot path); None for any other URL."""
    origin = _plain(url)
    return None if origin is None else origin.parsed


class _ClientHeaders(NamedTuple):
    """The client's own headers as str pairs, with their names in lower case."""

    source: list[tuple[bytes, bytes, bytes]]  # a copy of `Headers._list` they were decoded from
    pairs: list[tuple[str, str]]
    lowered: list[str]


class _Merged(NamedTuple):
    """The client's headers merged with one call's: the list (without Host and body headers), the
    lower-case names in it, and the list as it goes on the wire."""

    pairs: list[tuple[str, str]]
    present: frozenset[str]
    lines: str


class _Target(NamedTuple):
    origin: _Origin
    merged: _Merged


def _head(method: str, url: str, origin: _Origin, merged: _Merged, wire: list[tuple[str, str]], before: int) -> str:
    """The request line and header block as h11 writes them. `wire` is the header list sent:
    `before` headers (Host unless given, a zero Content-Length when due), `merged.pairs`, then
    the body's; the merged part is written from `merged.lines`, built once per header set."""
    lines = [f"{method} {url[origin.path:]} HTTP/1.1\r\n"]
    if "host" in merged.present:  # the caller's own Host: first on the wire, as h11 writes it
        lines += [f"{name}: {value}\r\n" for name, value in host_first(wire)]
    else:
        lines += [f"{name}: {value}\r\n" for name, value in wire[:before]]
        lines.append(merged.lines)
        lines += [f"{name}: {value}\r\n" for name, value in wire[before + len(merged.pairs):]]
    lines.append("\r\n")
    return "".join(lines)


class UpstreamClient(httpx.AsyncClient):
    """httpx's client on `WireTransport`. A plain call (`get`/`post`/`put`/... with at most
    headers, a JSON or bytes body and a timeout, to a URL httpx sends unchanged) goes straight to
    the pool: the same request on the wire, the same `httpx.Response` (body read, decoded by httpx),
    the same httpx exceptions, the same `httpx` log line; without httpx's request, auth, redirect
    and stream machinery, which cost more CPU than the pool's own work. Anything else (streams,
    params, redirects followed, auth, hooks, mounts) takes httpx's ordinary path."""

    _plain_client: _ClientHeaders | None = None
    _plain_merged: dict[Any, _Merged]
    _plain_base: httpx.URL | None = None  # the base URL seen to be empty (no path to join)

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
        if (
            data is None and files is None and params is None and cookies is None and extensions is None
            and (content is None or (json is None and type(content) is bytes))
            and isinstance(url, str)
        ):
            target = self._plain_target(url, headers, auth, follow_redirects)
            if target is not None:
                return await self._plain(method.upper(), url, target, content, json, timeout)
        return await super().request(
            method, url, content=content, data=data, files=files, json=json, params=params, headers=headers,
            cookies=cookies, auth=auth, follow_redirects=follow_redirects, timeout=timeout, extensions=extensions,
        )

    def _plain_target(self, url: str, headers: Any, auth: Any, follow_redirects: Any) -> _Target | None:
        """Where a call goes and the headers it sends, if it can take the plain path; else None."""
        if (
            auth is not _USE_DEFAULT
            or not (follow_redirects is False or (follow_redirects is _USE_DEFAULT and not self.follow_redirects))
            or not self._plain_client_state()
        ):
            return None
        origin = _plain(url)
        if origin is None:
            return None
        merged = self._merged(headers)
        if merged is None or "transfer-encoding" in merged.present:  # h11 chunk-frames the body: httpx's path
            return None
        return _Target(origin, merged)

    def plain_get(self, url: str, headers: Any) -> tuple[tuple[str, str, int], list[tuple[str, str]], bytes] | None:
        """Where a plain GET of `url` with `headers` goes, the header list it sends (`Host` first
        unless given) and the request as written; None when such a call would not take the plain
        path. For callers that read a response from the pool themselves (the fal status stream)
        while sending what httpx would."""
        target = self._plain_target(url, headers, _USE_DEFAULT, _USE_DEFAULT)
        if target is None:
            return None
        merged, origin = target.merged, target.origin
        wire = [] if "host" in merged.present else [("Host", origin.netloc)]
        before = len(wire)
        wire += merged.pairs
        return origin.key, wire, _head("GET", url, origin, merged, wire, before).encode("latin-1")

    def _plain_client_state(self) -> bool:
        """No auth, mounts, event hooks, base path, query params or cookies: nothing httpx would
        add to a call."""
        base = self._base_url
        if base is not self._plain_base:
            if base.raw_path != b"/":
                return False
            self._plain_base = base
        hooks = self._event_hooks
        return (
            isinstance(self._transport, WireTransport) and self._auth is None and not self._mounts
            and not hooks["request"] and not hooks["response"] and not self._params
            and (type(self._cookies) is _NoCookies or not self._cookies)  # (a _NoCookies keeps none)
        )

    def _merged(self, headers: Any) -> _Merged | None:
        """The client's headers with the call's `headers` replacing same-named ones (appended in
        the call's order); None unless `headers` is None or a dict of ASCII str names and values
        (what httpx encodes as ASCII), and every header is one h11 would write (`bad_header`)."""
        client = self._plain_client
        if client is None or client.source != self._headers._list:
            client = self._client_headers()
        if headers is None:
            key: Any = ()
        elif type(headers) is dict:
            key = tuple(headers.items())
        else:
            return None
        try:
            return self._plain_merged[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable value: not a str
            return None
        if headers and not all(
            type(k) is str and type(v) is str and k.isascii() and v.isascii() for k, v in headers.items()
        ):
            return None
        if headers:
            names = {name.lower() for name in headers}
            pairs = [pair for pair, low in zip(client.pairs, client.lowered, strict=True) if low not in names]
            pairs.extend(headers.items())
            present = frozenset(names.union(client.lowered))
        else:
            pairs, present = list(client.pairs), frozenset(client.lowered)
        if bad_header([(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]) is not None:
            return None  # httpx's path refuses it (`WireTransport`); never cached
        merged = _Merged(pairs, present, "".join(f"{name}: {value}\r\n" for name, value in pairs))
        if len(self._plain_merged) >= _CACHED:
            self._plain_merged.clear()
        self._plain_merged[key] = merged
        return merged

    def _client_headers(self) -> _ClientHeaders:
        """The client's own headers as str pairs (decoded again only when they changed); the merged
        header lists are worked out again too."""
        source = list(self._headers._list)
        pairs = [(raw.decode("latin-1"), value.decode("latin-1")) for raw, _, value in source]
        client = _ClientHeaders(source, pairs, [name.lower() for name, _ in pairs])
        self._plain_client = client
        self._plain_merged = {}
        return client

    async def _plain(
        self,
        method: str,
        url: str,
        target: _Target,
        content: bytes | None,
        json: Any,
        timeout: Any,
    ) -> httpx.Response:
        if self._state is ClientState.CLOSED:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        self._state = ClientState.OPENED
        transport = self._transport
        assert isinstance(transport, WireTransport)  # checked by _plain_client_state
        timeouts_ = self.timeout if timeout is _USE_DEFAULT or isinstance(timeout, UseClientDefault) else (
            timeout if type(timeout) is httpx.Timeout else httpx.Timeout(timeout)
        )
        merged, origin = target.merged, target.origin
        present = merged.present
        wire = [] if "host" in present else [("Host", origin.netloc)]
        body: bytes | None = None
        if content is not None:
            body = content
            length = bool(body)
            typed = False
        elif json is not None:  # as httpx encodes it
            body = _JSON.encode(json).encode("utf-8")
            length = typed = True
        else:
            length = typed = False
        if method in _BODY_METHODS and not length and "content-length" not in present and (
            "transfer-encoding" not in present
        ):
            wire.append(("Content-Length", "0"))
        before = len(wire)
        wire += merged.pairs
        if length and "content-length" not in present:
            assert body is not None
            wire.append(("Content-Length", str(len(body))))
        if typed and "content-type" not in present:
            wire.append(("Content-Type", "application/json"))
        sent = _Sent(method, url, wire, body, timeouts_)
        data = _head(method, url, origin, merged, wire, before).encode("latin-1")
        if body:
            data += body
        pool = transport.pool()
        started = time.perf_counter()
        try:
            answer = await pool.request(
                pool.origin(*origin.key), data, timeouts(timeouts_.pool, timeouts_.connect, timeouts_.read), whole=True,
                head_only=method == "HEAD", idempotent=method in IDEMPOTENT,
            )
            raw = await answer.read()
        except WireError as exc:
            raise httpx_error(exc, sent.request()) from exc
        response = _PlainResponse.read_from(
            answer, raw, sent, self._default_encoding, time.perf_counter() - started
        )
        if _httpx_log.isEnabledFor(logging.INFO):
            _httpx_log.info(
                'HTTP Request: %s %s "%s %d %s"', method, httpx.URL(url), response.http_version,
                response.status_code, response.reason_phrase,
            )
        if 300 <= response.status_code < 400 and response.has_redirect_location:  # not followed: as httpx
            response.next_request = self._build_redirect_request(response.request, response)
        return response
