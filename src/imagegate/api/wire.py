"""Exact, cheap reads of a request for the image routes, which read a few headers, the query and the
base URL on every request.

    header(request, name)       == request.headers.get(name), without raising KeyError on a miss
    query_param(request, name)  == request.query_params.get(name), without parsing an empty query
    base_url(request)           == str(request.base_url).rstrip("/"), remembered per (scheme, Host
                                   header, server, root path; a Host header up to 512 bytes):
                                   Starlette builds a URL from the whole scope for it (about 7 us)
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

__all__ = ["base_url", "header", "header_values", "query_param"]

_MAX_BASE_URLS = 256  # the Host header is the client's: a bounded memo, emptied when full
_MAX_HOST_BYTES = 512  # and of any length the server takes (megabytes): a longer one is not remembered
_base_urls: dict[tuple[Any, ...], str] = {}


def header(request: Request, name: bytes) -> str | None:
    """The first value of the header `name` (lower-case bytes, as ASGI servers send names)."""
    for key, value in request.scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def header_values(request: Request, name: bytes) -> list[str]:
    """Every value of the header `name` (lower-case bytes), in order: `request.headers.getlist(...)`."""
    return [bytes(value).decode("latin-1") for key, value in request.scope["headers"] if key == name]


def query_param(request: Request, name: str) -> str | None:
    if not request.scope.get("query_string"):
        return None
    return request.query_params.get(name)


def base_url(request: Request) -> str:
    """The gateway's URL as the client addressed it, without a trailing slash (for image URLs)."""
    scope = request.scope
    host = next((bytes(value) for key, value in scope["headers"] if key == b"host"), None)
    if host is not None and len(host) > _MAX_HOST_BYTES:
        return str(request.base_url).rstrip("/")
    server = scope.get("server")
    root = scope.get("app_root_path", scope.get("root_path", ""))
    memo_key = (scope.get("scheme", "http"), host, tuple(server) if server is not None else None, root)
    url = _base_urls.get(memo_key)
    if url is None:
        url = str(request.base_url).rstrip("/")
        if len(_base_urls) >= _MAX_BASE_URLS:
            _base_urls.clear()
        _base_urls[memo_key] = url
    return url
