"""What fal says of a running queue job, for an async job's `progress` (`in_progress` events).

A status payload (`?logs=1`) becomes `{status, queue_position, logs}`: the queue position only while
IN_QUEUE, the last `MAX_LOG_LINES` log messages, each passed through `core.redact.upstream_text` and
capped at `MAX_LOG_CHARS`. `ProgressReporter` forwards a report only when it changed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from imagegate.core.redact import upstream_text, upstream_token

__all__ = ["MAX_LOG_CHARS", "MAX_LOG_LINES", "OnProgress", "ProgressReporter", "status_progress"]

MAX_LOG_LINES = 5
MAX_LOG_CHARS = 200

OnProgress = Callable[[dict[str, Any]], Awaitable[None]]


def status_progress(body: Mapping[str, Any]) -> dict[str, Any]:
    status = upstream_token(body.get("status"))
    position = body.get("queue_position")
    if status != "IN_QUEUE" or not isinstance(position, int) or isinstance(position, bool) or position < 0:
        position = None
    raw = body.get("logs")
    lines = [item.get("message") for item in raw if isinstance(item, Mapping)] if isinstance(raw, list) else []
    logs = [text for text in (upstream_text(line, limit=MAX_LOG_CHARS) for line in lines[-MAX_LOG_LINES:]) if text]
    return {"status": status, "queue_position": position, "logs": logs}


class ProgressReporter:
    """Calls `on_progress` with each status payload's report that differs from the last one."""

    def __init__(self, on_progress: OnProgress) -> None:
        self.on_progress = on_progress
        self.last: dict[str, Any] | None = None

    async def __call__(self, body: Mapping[str, Any]) -> None:
        if body.get("status") == "COMPLETED":  # the job finishes now: its outcome says the rest
            return
        report = status_progress(body)
        if report != self.last:
            self.last = report
            await self.on_progress(report)
