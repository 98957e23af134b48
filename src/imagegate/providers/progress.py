"""What an upstream says of a running job, for an async job's `progress` (its `in_progress` events).

Every provider reports the same shape, `{status, queue_position, logs}`: the provider's own status
word (a safe token, else None), its queue position where it gives one (else None), and the last
`MAX_LOG_LINES` log lines, each passed through `core.redact.upstream_text` (secrets, markup and
control characters out) and capped at `MAX_LOG_CHARS`. `ChangedReports` forwards a report only when
it differs from the last one. The adapters turn their wire format into lines (fal: `logs[].message`
in `providers/fal/progress.py`; Replicate: the `logs` text of a prediction, `log_tail`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from imagegate.core.redact import upstream_text, upstream_token

__all__ = ["MAX_LOG_CHARS", "MAX_LOG_LINES", "ChangedReports", "OnProgress", "log_tail", "progress_report"]

MAX_LOG_LINES = 5
MAX_LOG_CHARS = 200
_TAIL_CHARS = MAX_LOG_LINES * MAX_LOG_CHARS * 8  # of a log text, only this much is read

OnProgress = Callable[[dict[str, Any]], Awaitable[None]]


def progress_report(status: Any, lines: Sequence[Any], queue_position: int | None = None) -> dict[str, Any]:
    """The report: `status` as a safe token, the last lines redacted and capped (non-text and empty
    lines dropped after the last `MAX_LOG_LINES` are taken)."""
    logs = [text for text in (upstream_text(line, limit=MAX_LOG_CHARS) for line in lines[-MAX_LOG_LINES:]) if text]
    return {"status": upstream_token(status), "queue_position": queue_position, "logs": logs}


def log_tail(text: Any) -> list[str]:
    """The last `MAX_LOG_LINES` non-blank lines of a log text (a growing string, as Replicate's
    `logs`), reading only its end: the work is bounded however long the log grew."""
    if not isinstance(text, str):
        return []
    tail = text[-_TAIL_CHARS:]
    lines = tail.splitlines()
    if len(tail) < len(text) and lines:
        lines = lines[1:]  # the first line of a cut tail is a fragment
    return [line for line in lines if line.strip()][-MAX_LOG_LINES:]


class ChangedReports:
    """Calls `on_progress` with each report that differs from the last one sent."""

    def __init__(self, on_progress: OnProgress) -> None:
        self.on_progress = on_progress
        self.last: dict[str, Any] | None = None

    async def send(self, report: dict[str, Any]) -> None:
        if report != self.last:
            self.last = report
            await self.on_progress(report)
