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


def _render(content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


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
        return JSONResponse(content, status_code=status_code, headers=headers)
    body = await asyncio.to_thread(_render, content)
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")
