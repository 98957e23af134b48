"""`api.wire` reads exactly what Starlette's `Request` reads."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.requests import Request

from imagegate.api import wire

HEADERS = [
    [(b"host", b"gateway.example:8443"), (b"prefer", b"respond-async"), (b"prefer", b"wait=5")],
    [(b"host", b"[::1]:8000"), (b"x-imagegate-route", b" fal ")],
    [(b"host", b"bad host:notaport")],
    [(b"host", b"")],
    [(b"host", b"Example.COM"), (b"host", b"second.example")],
    [],
]
SCOPES = [
    {"scheme": "http", "server": ("127.0.0.1", 8000), "root_path": ""},
    {"scheme": "https", "server": ("10.0.0.1", 443), "root_path": "/gw"},
    {"scheme": "http", "server": ["::1", 80], "root_path": "", "app_root_path": "/outer"},
    {"scheme": "http", "server": None, "root_path": ""},
    {"server": ("example.org", 80)},
]


def request(headers: list[tuple[bytes, bytes]], extra: dict[str, Any], query: bytes = b"") -> Request:
    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations", "query_string": query}
    return Request({**scope, **extra, "headers": list(headers)})


@pytest.mark.parametrize("headers", HEADERS)
@pytest.mark.parametrize("extra", SCOPES)
def test_base_url_is_starlettes(headers: list[tuple[bytes, bytes]], extra: dict[str, Any]) -> None:
    for _ in range(2):  # computed, then remembered
        assert wire.base_url(request(headers, extra)) == str(request(headers, extra).base_url).rstrip("/")


def test_the_base_url_memo_stays_bounded() -> None:
    for i in range(wire._MAX_BASE_URLS + 10):
        assert wire.base_url(request([(b"host", f"h{i}.example".encode())], SCOPES[0])) == f"http://h{i}.example"
    assert len(wire._base_urls) <= wire._MAX_BASE_URLS


@pytest.mark.parametrize("headers", HEADERS)
def test_headers_are_starlettes(headers: list[tuple[bytes, bytes]]) -> None:
    req = request(headers, SCOPES[0])
    for name in ("host", "prefer", "x-imagegate-route", "missing"):
        assert wire.header(req, name.encode()) == req.headers.get(name)
        assert wire.header_values(req, name.encode()) == req.headers.getlist(name)


@pytest.mark.parametrize("query", [b"", b"dry_run=1", b"route=fal&route=replicate", b"dry_run=&x=%20y", b"&&"])
def test_query_params_are_starlettes(query: bytes) -> None:
    req = request([], SCOPES[0], query)
    for name in ("dry_run", "route", "x"):
        assert wire.query_param(req, name) == req.query_params.get(name)


def test_the_base_url_memo_keeps_no_long_host_header() -> None:
    """The server takes a Host header of any length: the memo, which outlives the request, bounds the
    bytes it keeps, not only the entries (256 hosts of 4 MB would hold 2 GB)."""
    wire._base_urls.clear()
    host = b"h" * 100_000
    for i in range(3):
        req = request([(b"host", host + str(i).encode())], SCOPES[0])
        assert wire.base_url(req) == str(req.base_url).rstrip("/")
    assert sum(len(key[1] or b"") + len(url) for key, url in wire._base_urls.items()) < 10_000
