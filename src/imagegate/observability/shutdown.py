"""Graceful shutdown: the requests in flight, and how a request the server cancels is answered.

On SIGTERM uvicorn stops accepting, waits `shutdown_grace_seconds` for the requests in flight,
then cancels the request tasks still running and runs the app's shutdown at once. A cancelled
request cancels its upstream jobs on the way out (the adapters do); `ObservabilityMiddleware`
then ends its response with `ShutdownAnswer`, and the app's shutdown waits (`InFlight.drain`) for
those cancellations before closing the HTTP client, so no upstream job is left running unowned.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from starlette.types import Send

from imagegate.core.errors import InternalError

__all__ = ["InFlight", "ShutdownAnswer"]

log = logging.getLogger(__name__)
_SEND_TIMEOUT = 2.0


class InFlight:
    """The request tasks being served (added and removed by ObservabilityMiddleware)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return sum(1 for task in self.tasks if not task.done())

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for the requests in flight (and the upstream cancellations
        they run when cancelled), then cancel the rest and give them a moment. Returns how many
        had to be cancelled here."""
        pending = {t for t in self.tasks if not t.done() and t is not asyncio.current_task()}
        if not pending:
            return 0
        log.info("shutdown: waiting up to %.1fs for %d request(s) in flight", timeout, len(pending))
        _, pending = await asyncio.wait(pending, timeout=max(0.0, timeout))
        for task in pending:
            task.cancel()
        if pending:
            log.warning("shutdown: cancelled %d request(s) still in flight", len(pending))
            await asyncio.wait(pending, timeout=5.0)
        return len(pending)


@dataclass(frozen=True, slots=True)
class ShutdownAnswer:
    """How to end a response whose request the server cancelled:

    - nothing sent yet: a 503 `server_shutting_down` envelope (`retry-after: 1`; `x-should-retry:
      false` when an upstream had started the work, which may be billed);
    - an event stream under way: its `event: error` frame with that envelope, then the end;
    - a response already complete: nothing to do;
    - any other started response: it cannot be ended cleanly (`send` returns False)."""

    started: bool
    finished: bool
    event_stream: bool
    costly: bool
    request_id: object = None

    @staticmethod
    def envelope() -> dict[str, Any]:
        return InternalError(
            "The server is shutting down and cancelled this request before it finished.",
            code="server_shutting_down",
            status=503,
        ).envelope()

    async def send(self, send: Send) -> bool:
        if self.finished:
            return True
        if self.started and not self.event_stream:
            return False
        payload = json.dumps(self.envelope(), separators=(",", ":"))
        try:
            async with asyncio.timeout(_SEND_TIMEOUT):
                if self.started:
                    body = f"event: error\ndata: {payload}\n\n".encode()
                else:
                    await send({"type": "http.response.start", "status": 503, "headers": self._headers()})
                    body = payload.encode()
                await send({"type": "http.response.body", "body": body, "more_body": False})
        except Exception:  # the client is gone
            return False
        return True

    def _headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
        if self.costly:
            headers.append((b"x-should-retry", b"false"))
        if isinstance(self.request_id, str):
            headers.append((b"x-request-id", self.request_id.encode("latin-1")))
        return headers
