"""The connection cap of one worker process (`ConnectionGuard`) and the app of a connection admitted
beyond it (`_HealthOnly`); the protocols of `imagegate.server.guard` consult it on each connect.

The cap (`ConnectionGuard`, one per worker process): with `max_connections` open, a new connection
first evicts the oldest *idle* one (keep-alive or not a byte yet, for at least
`EVICTABLE_AFTER` seconds). If none is, up to
`reserved_connections` more are accepted but may only ask for `/healthz` or `/readyz`; anything else
gets `503 server_busy` and the connection is closed. Beyond that, a new connection is answered
`503 server_busy` at once, without reading its request, and our side is shut. Up to
`reserved_connections` such connections linger until the client closes (at most `REFUSED_LINGER`
seconds, in `imagegate.server.guard`), reading and dropping what it sends: closing a socket with
unread data would reset it and the client could lose the answer. Beyond those, the connection is
closed at once. Each of these conditions is logged at most once per `log_interval`, with a count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from imagegate.observability.ratelog import RateLimitedLog
from imagegate.server.pacing import StartPacer
from imagegate.settings import ServerSettings

if TYPE_CHECKING:
    from imagegate.server.guard import _GuardMixin

__all__ = ["EVICTABLE_AFTER", "HEALTH_PATHS", "ConnectionGuard", "_HealthOnly"]

logger = logging.getLogger("imagegate.server")

HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
EVICTABLE_AFTER = 1.0  # seconds idle before a connection may be closed to admit a new one
_BUSY_MESSAGE = "The server has too many open connections; retry shortly."


class ConnectionGuard:
    """The open connections of one worker process, idle ones in age order, and the cap."""

    def __init__(self, settings: ServerSettings, max_connections: int) -> None:
        self.settings = settings
        self.max_connections = max_connections
        self.open: set[_GuardMixin] = set()
        self.lingering = 0  # refused connections waiting for their client to close
        self._pacer: StartPacer | None = None
        self.idle: OrderedDict[_GuardMixin, float] = OrderedDict()  # connection -> idle since
        self.evicted = RateLimitedLog(
            logger,
            settings.log_interval,
            "connection limit (%d) reached: closed %d idle connection(s) to admit new ones",
        )
        self.overflow = RateLimitedLog(
            logger,
            settings.log_interval,
            "connection limit (%d) reached with no idle connection: %d connection(s) admitted for health checks only",
        )
        self.refused = RateLimitedLog(
            logger,
            settings.log_interval,
            "connection limit (%d) and its health reserve are full: closed %d new connection(s) at once",
        )

    def admit(self, conn: _GuardMixin) -> str:
        """Register a new connection; returns "ok", "health-only" or "refuse"."""
        self.open.add(conn)
        if len(self.open) <= self.max_connections:
            return "ok"
        for victim, since in self.idle.items():  # oldest first
            if time.monotonic() - since < EVICTABLE_AFTER:
                break  # a connection this fresh has not had its chance to send a request yet
            victim.close_idle()
            self.evicted.hit(self.max_connections)
            return "ok"
        if len(self.open) <= self.max_connections + self.settings.reserved_connections:
            self.overflow.hit(self.max_connections)
            return "health-only"
        self.refused.hit(self.max_connections)
        return "refuse"

    def pacer(self, loop: asyncio.AbstractEventLoop) -> StartPacer | None:
        """The request-start pacer of this process's loop (None: `starts_per_tick` is 0)."""
        if self._pacer is None and self.settings.starts_per_tick:
            self._pacer = StartPacer(loop, self.settings.starts_per_tick)
        return self._pacer

    def set_idle(self, conn: _GuardMixin, idle: bool) -> None:
        if idle:
            self.idle.pop(conn, None)
            self.idle[conn] = time.monotonic()
        else:
            self.idle.pop(conn, None)

    def forget(self, conn: _GuardMixin) -> None:
        self.open.discard(conn)
        self.idle.pop(conn, None)


class _HealthOnly:
    """The ASGI app of a connection admitted beyond the cap: health checks, or 503 server_busy."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in HEALTH_PATHS:
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"error": {"message": _BUSY_MESSAGE, "type": "server_error", "param": None, "code": "server_busy"}}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
