"""Per-connection guards for uvicorn's HTTP protocols: read timeouts and a connection cap.

uvicorn times out only the idle gap *after* a response (`timeout_keep_alive`). A socket that never
sends a byte, sends its headers at 1 byte/s or dribbles its body stays open for ever, and each one
holds a file descriptor. The protocol classes here (`GuardedH11Protocol`, `GuardedHttpToolsProtocol`:
uvicorn's own, plus `_GuardMixin`) add, per connection, one timer for the phase it is in:

    phase     starts                               closes the connection when
    idle      connect / a response was sent         header_timeout after connect (uvicorn's keep-alive
                                                    timer covers the gap after a response)
    headers   the first byte of a request          the headers are not complete header_timeout later
    body      the headers are complete             body_timeout + (bytes received / body_min_rate)
                                                    seconds after the headers, unless it is complete
    app       the body is complete                 never (the request's own deadline applies)

A cut request whose response has not started gets `408 request_timeout` in OpenAI's envelope; the
app, if it waits on the body, sees a disconnect.

The connection cap (`ConnectionGuard`, one per worker process) and what a connection beyond it
gets are described in `imagegate.server.cap`; `_GuardMixin` asks it on connect, and `_refuse`
answers and lingers as described there.

`GET /healthz` (httptools protocol) runs the app as soon as its headers are parsed, inside the
read callback, instead of in a new task: the app answers it without waiting on anything, so the
answer is written before the loop runs the callbacks already queued. A task would run only after
all of them: with thousands of jobs in flight a loop iteration can queue hundreds of
milliseconds of work, and the health check waited for it. The same app runs (middlewares,
headers, metrics, access log); should it wait on something after all (a paused transport), the
rest runs in a task as any request's would. One pipelined behind a request still in progress
starts from uvicorn's pipeline when that one completes, in a task, as before.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from imagegate.observability.ratelog import RateLimitedLog
from imagegate.server.cap import _BUSY_MESSAGE, ConnectionGuard, _HealthOnly
from imagegate.server.pacing import HEALTH_REQUESTS, StartPacer

__all__ = ["GuardedH11Protocol", "_GuardMixin", "guarded_protocol_class"]

logger = logging.getLogger("imagegate.server")

EAGER_PATH = "/healthz"  # answered inside the read callback (module docstring); /readyz awaits its checks
_IDLE, _HEADERS, _BODY, _APP, _REFUSED = "idle", "headers", "body", "app", "refused"


def _error(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error" if status < 500 else "server_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


REQUEST_TIMEOUT = _error(408, "Request Timeout", "request_timeout", "The request was not received in time.")
SERVER_BUSY = _error(503, "Service Unavailable", "server_busy", _BUSY_MESSAGE, "retry-after: 1\r\n")
REFUSED_LINGER = 2.0  # seconds a refused connection stays open, reading and dropping, after its 503


class _GuardMixin:
    """Phase timers and cap admission on top of a uvicorn HTTP protocol (see the module docstring).

    It relies on what uvicorn's h11 and httptools protocols share: `config`, `loop`, `transport`,
    `app`, `cycle` (with `more_body`, `response_complete`, `disconnected`, `message_event`) and the
    hooks `connection_made`, `data_received`, `on_response_complete`, `connection_lost`."""

    config: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    app: Any
    cycle: Any

    _guard: ConnectionGuard
    _unset_keepalive_if_required: Callable[[], None]
    _phase: str = _IDLE
    _timer: asyncio.TimerHandle | None = None
    _body_started: float = 0.0
    _body_bytes: int = 0
    _waiting: bytearray | None = None  # a new request's bytes while it waits for a start (pacing)
    _reading: bool = False  # in the parser's callbacks for bytes received: `GET /healthz` may run eagerly

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._guard = self.config.connection_guard
        self._phase = _IDLE
        verdict = self._guard.admit(self)
        if verdict == "refuse":
            self._guard.forget(self)
            self._refuse()
            return
        if verdict == "health-only":
            self.app = _HealthOnly(self.app)
        self._guard.set_idle(self, True)
        self._arm(self._guard.settings.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._phase == _REFUSED:
            return  # read and dropped: closing with unread data would reset the connection
        if self._waiting is not None:
            self._waiting += data
            return
        if self._phase == _IDLE and not data.startswith(HEALTH_REQUESTS):
            pacer = self._guard.pacer(self.loop)
            if pacer is not None and not pacer.try_start():
                self._wait_turn(pacer, data)
                return
        self._receive(data)

    def _wait_turn(self, pacer: StartPacer, data: bytes) -> None:
        """A new request beyond this iteration's starts (`pacing`): its bytes are kept, its socket
        paused and its idle timer stopped (it is the server's turn now, not the client's)."""
        self._waiting = bytearray(data)
        self._guard.set_idle(self, False)  # a request: never evicted as idle while it waits
        self._disarm()
        self._unset_keepalive_if_required()  # uvicorn's keep-alive timer: the client did send
        self.transport.pause_reading()
        pacer.defer(self._take_turn)

    def _take_turn(self) -> bool:
        data, self._waiting = bytes(self._waiting or b""), None
        if self.transport.is_closing():
            return False
        self.transport.resume_reading()
        self._receive(data)
        return True

    def _receive(self, data: bytes) -> None:
        if self._phase == _IDLE:
            self._phase = _HEADERS
            self._guard.set_idle(self, False)
            self._arm(self._guard.settings.header_timeout)
        elif self._phase == _BODY:
            self._body_bytes += len(data)
        previous = self.cycle
        self._reading = True
        try:
            super().data_received(data)  # type: ignore[misc]
        finally:
            self._reading = False
        self._sync_phase(answered=self.cycle is not previous)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """uvicorn's httptools hook that starts a request: `GET /healthz` runs eagerly when its
        bytes were just read. One started from uvicorn's pipeline (when the request before it
        completes, inside that one's last send) runs in a task: run there eagerly, each queued
        check would start the next inside its own answer, one nested call per check."""
        # A request starts: uvicorn's keep-alive timer must not run. uvicorn stops it before each
        # read and each start from its pipeline, but an eager answer arms it again in the middle of
        # a read, and a request parsed after it in that read starts here, not from the pipeline.
        self._unset_keepalive_if_required()
        scope = cycle.scope
        if not self._reading or scope["path"] != EAGER_PATH or scope["method"] != "GET":
            super()._start_asgi_task(cycle, app)  # type: ignore[misc]
            return
        # the context a new task would run in
        reset = getattr(self.config, "reset_contextvars", False)
        context = contextvars.Context() if reset else contextvars.copy_context()
        coro = cycle.run_asgi(app)
        self._reading = False  # a start its answer makes from the pipeline goes to a task
        try:
            waiting_on = context.run(coro.send, None)
        except StopIteration:
            return
        finally:
            self._reading = True
        task = self.loop.create_task(_resume(coro, waiting_on), context=context)
        tasks = self.tasks  # type: ignore[attr-defined]
        task.add_done_callback(tasks.discard)
        tasks.add(task)

    def _refuse(self) -> None:
        """503 server_busy before the request is read, our side shut; the socket lingers (reading and
        dropping) until the client closes or REFUSED_LINGER seconds, while lingering slots last."""
        self._phase = _REFUSED
        self.transport.write(SERVER_BUSY)
        guard = self._guard
        if guard.lingering >= guard.settings.reserved_connections or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        guard.lingering += 1
        self._timer = self.loop.call_later(REFUSED_LINGER, self.transport.close)

    def eof_received(self) -> None:
        if self._phase == _REFUSED:
            self.transport.close()
            return
        super().eof_received()  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._sync_phase()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._phase == _REFUSED and self._timer is not None:
            self._guard.lingering -= 1
        self._disarm()
        self._guard.forget(self)
        super().connection_lost(exc)  # type: ignore[misc]

    def close_idle(self) -> None:
        """Evicted to make room: close quietly (a keep-alive client simply reconnects)."""
        self._disarm()
        self._guard.forget(self)
        self.transport.close()

    # -- phases ----------------------------------------------------------------------------------

    def _sync_phase(self, answered: bool = False) -> None:
        """`answered`: the data just received started a request (a new cycle): if its response is
        complete already (an eager health check), the connection is idle again."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            if self._phase in (_BODY, _APP) or (answered and cycle is not None and self._phase == _HEADERS):
                # a response went out: uvicorn's keep-alive timer runs now
                self._phase = _IDLE
                self._disarm()
                self._guard.set_idle(self, True)
            return
        if cycle.more_body:
            if self._phase != _BODY:
                self._phase = _BODY
                self._body_started = self.loop.time()
                self._body_bytes = 0
                self._arm(self._guard.settings.body_timeout)
        elif self._phase != _APP:
            self._phase = _APP
            self._disarm()

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        settings = self._guard.settings
        if self._phase == _BODY:
            deadline = self._body_started + settings.body_timeout + self._body_bytes / settings.body_min_rate
            remaining = deadline - self.loop.time()
            if remaining > 0:  # the body kept arriving fast enough: check again at the new deadline
                self._timer = self.loop.call_later(remaining, self._on_timer)
                return
        elif self._phase == _APP:
            return
        self._cut()

    def _cut(self) -> None:
        cycle = self.cycle
        started = cycle is not None and not cycle.response_complete and getattr(cycle, "response_started", False)
        if self._phase != _IDLE and not started:
            self.transport.write(REQUEST_TIMEOUT)
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self._guard.forget(self)
        self.transport.close()
        _timeouts[self._phase].hit()


async def _resume(coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    """Run `coro` on from where its eager first step stopped, as the task it would have been:
    each future it waits on is awaited here, and a cancellation is thrown into it."""
    while True:
        try:
            if isinstance(waiting_on, asyncio.Future):
                await asyncio.wait((waiting_on,))
            else:
                await asyncio.sleep(0)  # a bare yield
        except asyncio.CancelledError as exc:
            if isinstance(waiting_on, asyncio.Future):
                waiting_on.cancel()
            step = functools.partial(coro.throw, exc)
        else:
            step = functools.partial(coro.send, None)
        try:
            waiting_on = step()
        except StopIteration:
            return


_timeouts = {
    phase: RateLimitedLog(logger, 60.0, f"closed %d connection(s) that sent no complete {what} in time")
    for phase, what in ((_IDLE, "request"), (_HEADERS, "request headers"), (_BODY, "request body"))
}


class GuardedH11Protocol(_GuardMixin, H11Protocol):
    """uvicorn's h11 protocol with read timeouts and the connection cap."""


def guarded_protocol_class(http: str) -> str:
    """Import path of the guarded protocol for `server.http` ("auto": httptools if installed, else h11).

    A path, not a class, so that uvicorn's worker processes import it themselves."""
    if http in ("auto", "httptools"):
        try:
            import httptools  # noqa: F401
        except ImportError:
            if http == "httptools":
                raise
        else:
            return "imagegate.server.guard_httptools:GuardedHttpToolsProtocol"
    return "imagegate.server.guard:GuardedH11Protocol"
