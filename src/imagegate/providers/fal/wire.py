"""What fal's bodies are on the wire: a JSON object (or not), an SSE status event."""

from __future__ import annotations

import json
from typing import Any

import httpx

from imagegate.core.errors import UpstreamError

__all__ = ["json_object", "json_or_none", "sse_event"]


def json_object(response: httpx.Response, *, accepted: bool = False) -> dict[str, Any]:
    body = json_or_none(response)
    if not isinstance(body, dict):
        raise UpstreamError(f"fal answered HTTP {response.status_code} with a body that is not a JSON object.",
                            accepted=accepted)
    return body


def json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def sse_event(data: list[str]) -> dict[str, Any] | None:
    if not data:
        return None
    try:
        event = json.loads("\n".join(data))
    except ValueError:
        return None
    return event if isinstance(event, dict) else None
