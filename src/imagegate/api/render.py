"""JSON responses whose rendering may be heavy: an `ImagesResponse` (or a job holding one) with
`b64_json` images is megabytes of JSON; rendering it takes tens of milliseconds, so past
`THREAD_BYTES` of image data it is rendered in a thread instead of on the event loop. The bytes are
exactly what `JSONResponse` renders."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse, Response

__all__ = ["THREAD_BYTES", "json_response"]

THREAD_BYTES = 256 * 1024


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))  # JSONResponse's settings
_NO_BODY_STATUS = (204, 304)


def _render(content: Any) -> bytes:
    """`JSONResponse.render`, with the encoder built once (`json.dumps` with settings builds one per call)."""
    return _ENCODER.encode(content).encode("utf-8")


def _response(body: bytes, status_code: int, headers: Mapping[str, str] | None) -> JSONResponse:
    """What `JSONResponse(content, status_code, headers)` builds, for a rendered `body`: the same
    attributes, the raw headers in the same order (the given ones lower-cased, then content-length
    and content-type unless given), without its constructor chain."""
    response = JSONResponse.__new__(JSONResponse)
    response.status_code = status_code
    response.background = None
    response.body = body
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()] if headers else []
    keys = [key for key, _ in raw]
    if b"content-length" not in keys and not (status_code < 200 or status_code in _NO_BODY_STATUS):
        raw.append((b"content-length", str(len(body)).encode("latin-1")))
    if b"content-type" not in keys:
        raw.append((b"content-type", b"application/json"))
    response.raw_headers = raw
    return response


def _image_bytes(content: Any) -> int:
    """The b64 image data in an ImagesResponse, or in a job's `result`."""
    if not isinstance(content, Mapping):
        return 0
    result = content.get("result")
    data = (result if isinstance(result, Mapping) else content).get("data")
    if not isinstance(data, list):
        return 0
    return sum(len(item.get("b64_json") or "") for item in data if isinstance(item, Mapping))


async def json_response(
    content: Any, *, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    if _image_bytes(content) < THREAD_BYTES:
        return _response(_render(content), status_code, headers)
    return _response(await asyncio.to_thread(_render, content), status_code, headers)
