"""Backpressure: one in-flight budget for image requests, checked before their bodies are read.

The budget has two dimensions, both from `limits` in the settings:

    max_inflight_requests   image requests being handled at once
    max_inflight_bytes      the bytes they hold: at admission an estimate of 3 x the body
                            (`Content-Length`; a body without one is counted while it streams in),
                            replaced once the inputs are probed by the body plus twice the decoded
                            size of every input image (`width * height * 4`: the decoded image and
                            the image made from it)

`AdmissionMiddleware` (pure ASGI) admits `POST /v1/images/...` before the app reads a byte of the
body. A request that does not fit waits in a FIFO queue of at most `limits.max_queued` requests
for at most `limits.queue_timeout_seconds`; when the queue is full or the wait runs out it gets
a fast `503 server_busy` in OpenAI's envelope with `retry-after` (the SDKs retry it). Its share of
the budget is released when its response is finished (streams included), whatever the outcome.

`charge_inputs(scope, request)` is the second step, called by the image routes after parsing: it
settles the request's share at its real size, giving back an overestimate at once, or waiting for
the rest (before any new request; 503 if it cannot get it in time). A request's share is capped at
`max_inflight_bytes`, so a single large request can still run alone.

Memory return: when at least `limits.trim_after_bytes` were released since the last time and the
bytes in flight have stayed at or below a sixteenth of the budget for a second,
glibc's `malloc_trim(0)` runs in a thread, handing freed heap pages back to the OS (without it,
RSS stays near its peak after a burst). No-op where the C library has no `malloc_trim`.

Rejections are logged once per `_LOG_INTERVAL` seconds with their count, not once per request.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegate.api.errors import gateway_error_response
from imagegate.core.errors import GatewayError
from imagegate.core.request import ImageRequest
from imagegate.observability.ratelog import RateLimitedLog
from imagegate.settings import LimitsSettings

__all__ = [
    "AdmissionMiddleware",
    "Budget",
    "ServerBusy",
    "Ticket",
    "charge_inputs",
    "decoded_bytes",
    "discharge_inputs",
    "malloc_trim",
]

logger = logging.getLogger(__name__)

_STATE_KEY = "admission_ticket"
_LOG_INTERVAL = 10.0
BYTES_PER_PIXEL = 4  # decoded RGBA
ESTIMATE_FACTOR = 3  # at admission, before the inputs are probed: body + decoded ~ 2 x body


class ServerBusy(GatewayError):
    """503: the in-flight budget is spent; retry after `retry_after` seconds."""

    status = 503
    type = "server_error"
    code = "server_busy"


@dataclass(eq=False)
class Ticket:
    """One admitted request's share of the budget."""

    bytes: int = 0
    body: int = 0  # body bytes: declared, or counted as they arrive
    released: bool = False


@dataclass(eq=False)
class _Waiter:
    size: int
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    grow: bool = False  # a top-up of an admitted request (needs no new request slot)


class Budget:
    """Requests and bytes in flight, with a bounded FIFO queue for those that do not fit yet."""

    def __init__(
        self,
        *,
        max_requests: int,
        max_bytes: int,
        max_queued: int = 0,
        queue_timeout: float = 0.0,
        retry_after: float = 1.0,
        trim_after_bytes: int = 0,
        trim_delay: float = 1.0,
        trim: Callable[[], object] | None = None,
    ) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.retry_after = retry_after
        self.requests = 0
        self.bytes = 0
        self.rejected = 0
        self._queue: collections.deque[_Waiter] = collections.deque()  # new requests, FIFO
        self._growing: collections.deque[_Waiter] = collections.deque()  # admitted ones, served first
        self._trim_after = trim_after_bytes
        self._trim = trim if trim is not None else malloc_trim
        self._since_trim = 0  # bytes released since the last trim
        self._trim_delay = trim_delay
        self._trim_timer: asyncio.TimerHandle | None = None
        self.trims = 0
        self._busy_log = RateLimitedLog(
            logger,
            _LOG_INTERVAL,
            "server busy: image request(s) refused with 503 (in flight: %d requests, %d bytes; "
            "limits.max_inflight_requests=%d, max_inflight_bytes=%d); %d since the last report",
        )

    @classmethod
    def from_limits(cls, limits: LimitsSettings) -> Budget:
        return cls(
            max_requests=limits.max_inflight_requests,
            max_bytes=limits.max_inflight_bytes,
            max_queued=limits.max_queued,
            queue_timeout=limits.queue_timeout_seconds,
            retry_after=limits.busy_retry_after_seconds,
            trim_after_bytes=limits.trim_after_bytes,
        )

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _fits(self, size: int, *, grow: bool) -> bool:
        if not grow and self.requests >= self.max_requests:
            return False
        return self.bytes + size <= self.max_bytes

    def _take(self, ticket: Ticket, size: int, *, grow: bool) -> None:
        if not grow:
            self.requests += 1
        self.bytes += size
        ticket.bytes += size

    async def admit(self, size: int) -> Ticket:
        """A new request holding `size` bytes; raises ServerBusy if it cannot get in in time."""
        ticket = Ticket()
        await self._acquire(ticket, min(size, self.max_bytes), grow=False)
        return ticket

    async def settle(self, ticket: Ticket, total: int) -> None:
        """Set an admitted request's share to `total` bytes (capped at the whole budget): give back
        what its estimate held too much, or wait for the rest like an admission."""
        total = min(total, self.max_bytes)
        if ticket.released or total == ticket.bytes:
            return
        if total < ticket.bytes:
            self.bytes -= ticket.bytes - total
            ticket.bytes = total
            self._wake()
        else:
            await self._acquire(ticket, total - ticket.bytes, grow=True)

    def grow_now(self, ticket: Ticket, size: int) -> None:
        """Add `size` bytes to an admitted request's share now (capped at the whole budget), or
        raise ServerBusy at once: for a body counted while it streams in, where nothing can wait."""
        size = max(0, min(size, self.max_bytes - ticket.bytes))
        if not size or ticket.released:
            return
        if self._growing or not self._fits(size, grow=True):
            raise self._busy()
        self._take(ticket, size, grow=True)

    async def _acquire(self, ticket: Ticket, size: int, *, grow: bool) -> None:
        """Take `size` bytes (and a request slot unless `grow`) now, or wait for them. An admitted
        request that grows goes before every new one (it holds memory already; finishing it frees
        more) and is not counted against `max_queued`."""
        queue = self._growing if grow else self._queue
        if not self._growing and (grow or not self._queue) and self._fits(size, grow=grow):
            self._take(ticket, size, grow=grow)
            return
        if self.queue_timeout <= 0 or (not grow and len(self._queue) >= self.max_queued):
            raise self._busy()
        waiter = _Waiter(size, grow=grow)
        queue.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_timeout)
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled():  # granted just as we gave up
                self.requests -= 0 if grow else 1
                self.bytes -= size
            else:
                waiter.future.cancel()  # _wake drops it from the queue
            self._wake()
            if isinstance(exc, TimeoutError):
                raise self._busy() from None
            raise
        ticket.bytes += size  # _wake counted the request and its bytes

    def release(self, ticket: Ticket) -> None:
        """Give back everything `ticket` holds (idempotent)."""
        if ticket.released:
            return
        ticket.released = True
        self.requests -= 1
        self.bytes -= ticket.bytes
        self._since_trim += ticket.bytes
        ticket.bytes = 0
        self._wake()
        self._maybe_trim()

    def _wake(self) -> None:
        while self._growing or self._queue:
            queue = self._growing or self._queue
            head = queue[0]
            if head.future.done():
                queue.popleft()
                continue
            if not self._fits(head.size, grow=head.grow):
                return
            queue.popleft()
            if not head.grow:
                self.requests += 1
            self.bytes += head.size
            head.future.set_result(None)

    def _busy(self) -> ServerBusy:
        self.rejected += 1
        self._busy_log.hit(self.requests, self.bytes, self.max_requests, self.max_bytes)
        return ServerBusy(
            "The server is busy with other image requests. Please retry after a short delay.",
            retry_after=self.retry_after,
        )

    def _maybe_trim(self) -> None:
        """After a burst (enough bytes released since the last trim, few in flight now), trim once
        the budget has stayed quiet for `trim_delay` seconds."""
        if self._trim_after <= 0 or self._since_trim < self._trim_after or self._trim_timer is not None:
            return
        if self.bytes > self.max_bytes // 16:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no running loop (release() called from plain code)
            self._run_trim()
            return
        self._trim_timer = loop.call_later(self._trim_delay, self._trim_when_quiet, loop)

    def _trim_when_quiet(self, loop: asyncio.AbstractEventLoop) -> None:
        self._trim_timer = None
        if self.bytes <= self.max_bytes // 16:
            self._since_trim = 0
            loop.run_in_executor(None, self._run_trim)

    def _run_trim(self) -> None:
        self._since_trim = 0
        self.trims += 1
        self._trim()


# -- the ASGI seam ---------------------------------------------------------------------------------


class AdmissionMiddleware:
    """Admit `POST /v1/images/...` through `budget` before the app reads the body (see module doc).

    Install it inside the request-context middleware (so the 503 carries `x-request-id` and the body
    size limit applies first)."""

    def __init__(self, app: ASGIApp, *, budget: Budget) -> None:
        self.app = app
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/images/"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        try:
            ticket = await self.budget.admit((declared or 0) * ESTIMATE_FACTOR)
        except ServerBusy as busy:
            rid = scope.get("state", {}).get("request_id")
            await gateway_error_response(busy, rid if isinstance(rid, str) else None)(scope, receive, send)
            return
        ticket.body = declared or 0
        scope.setdefault("state", {})[_STATE_KEY] = ticket
        if declared is None:
            receive = self._counting(receive, ticket)
        try:
            await self.app(scope, receive, send)
        finally:
            self.budget.release(ticket)

    def _counting(self, receive: Receive, ticket: Ticket) -> Receive:
        """For bodies without Content-Length: charge the bytes as they arrive."""

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                self.budget.grow_now(ticket, size)
                ticket.body += size
            return message

        return counted


async def charge_inputs(scope: Scope, request: ImageRequest) -> None:
    """Replace the admitted request's estimate by its real share: body + twice the decoded inputs
    (the decoded images and what is made from them). A no-op outside the middleware."""
    ticket = scope.get("state", {}).get(_STATE_KEY)
    budget = _budget_of(scope)
    if isinstance(ticket, Ticket) and budget is not None:
        await budget.settle(ticket, ticket.body + 2 * decoded_bytes(request))


async def discharge_inputs(scope: Scope) -> None:
    """Give back the decoded-input part of the admitted request's share, keeping its body: for a
    request that waits instead of working (an idempotent duplicate). `charge_inputs` takes it again."""
    ticket = scope.get("state", {}).get(_STATE_KEY)
    budget = _budget_of(scope)
    if isinstance(ticket, Ticket) and budget is not None:
        await budget.settle(ticket, ticket.body)


def _budget_of(scope: Scope) -> Budget | None:
    budget = getattr(getattr(scope.get("app"), "state", None), "budget", None)
    return budget if isinstance(budget, Budget) else None


def decoded_bytes(request: ImageRequest) -> int:
    """What the inputs held in memory take once decoded (width * height * 4 each)."""
    images = [*request.images, *([request.mask] if request.mask is not None else [])]
    return sum((i.width or 0) * (i.height or 0) * BYTES_PER_PIXEL for i in images if i.data is not None)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-length":
            text = bytes(value).decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


_libc: Any = None


def malloc_trim() -> bool:
    """Ask glibc to return free heap memory to the OS; False where that is not available."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        return False
    return bool(_libc.malloc_trim(0))
