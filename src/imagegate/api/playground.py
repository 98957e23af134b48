"""The browser playground: `GET /` and `GET /playground` serve one page, `GET /playground/<file>`
its scripts and styles. The files ship inside the package (`imagegate/playground/static/`); the
page talks to the gateway only through the public API (same origin, so no CORS is involved).

Every response carries a strict Content-Security-Policy (own scripts and styles only, no inline
code, no third-party origin), so the page works offline and nothing on it can call elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

__all__ = ["SECURITY_HEADERS", "router"]

router = APIRouter(include_in_schema=False)

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_NAME = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,60}\.(?:js|css|svg)\Z")
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob: https: http:; "
        "connect-src 'self' blob:; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


@functools.cache
def _packaged() -> frozenset[str]:
    """The names of the packaged static files, listed once: only these reach the cache below."""
    static = resources.files("imagegate.playground").joinpath("static")
    return frozenset(node.name for node in static.iterdir() if node.is_file())


@functools.cache
def _static_file(name: str) -> tuple[bytes, str] | None:
    """(bytes, etag) of a packaged file, read once."""
    node = resources.files("imagegate.playground").joinpath("static", name)
    if not node.is_file():
        return None
    data = node.read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _serve(request: Request, name: str) -> Response:
    found = _static_file(name) if name in _packaged() else None  # a made-up name caches nothing
    if found is None:
        return Response(status_code=404, content="Not Found", media_type="text/plain")
    data, etag = found
    headers = {**SECURITY_HEADERS, "etag": etag, "cache-control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    media_type = _MEDIA_TYPES[name[name.rindex(".") :]]
    return Response(content=data, media_type=media_type, headers=headers)


@router.get("/")
@router.get("/playground")
async def playground_page(request: Request) -> Response:
    """The page. Its asset and API URLs are relative, so it also works behind a path prefix."""
    return _serve(request, "index.html")


@router.get("/playground/")
async def playground_slash() -> Response:
    return RedirectResponse("../playground", status_code=308)


@router.get("/playground/{name}")
async def playground_asset(request: Request, name: str) -> Response:
    if not _NAME.match(name):
        return Response(status_code=404, content="Not Found", media_type="text/plain")
    return _serve(request, name)
