"""What fal says of a running queue job, for an async job's `progress` (`in_progress` events).

A status payload (`?logs=1`) becomes `{status, queue_position, logs}` (`providers.progress`): the
queue position only while IN_QUEUE, the last log messages, redacted and capped. `ProgressReporter`
forwards a report only when it changed, and none for COMPLETED (the job's outcome says the rest).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imagegate.providers.progress import MAX_LOG_CHARS, MAX_LOG_LINES, ChangedReports, OnProgress, progress_report

__all__ = ["MAX_LOG_CHARS", "MAX_LOG_LINES", "OnProgress", "ProgressReporter", "status_progress"]


def status_progress(body: Mapping[str, Any]) -> dict[str, Any]:
    status = body.get("status")
    position = body.get("queue_position")
    if status != "IN_QUEUE" or not isinstance(position, int) or isinstance(position, bool) or position < 0:
        position = None
    raw = body.get("logs")
    lines = [item.get("message") for item in raw if isinstance(item, Mapping)] if isinstance(raw, list) else []
    return progress_report(status, lines, position)


class ProgressReporter(ChangedReports):
    """Calls `on_progress` with each status payload's report that differs from the last one."""

    async def __call__(self, body: Mapping[str, Any]) -> None:
        if body.get("status") == "COMPLETED":  # the job finishes now: its outcome says the rest
            return
        await self.send(status_progress(body))
