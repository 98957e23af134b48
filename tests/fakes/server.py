"""Run any ASGI app (a fake upstream or the gateway itself) with uvicorn on 127.0.0.1 in a thread.

with LocalServer(app) as srv:
    httpx.get(srv.url + "/health")
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import uvicorn
from starlette.requests import Request


class LocalServer:
    """uvicorn in a background thread on an ephemeral 127.0.0.1 port. ``url`` has no trailing slash.

    If ``app.state`` has ``on_start`` / ``on_stop`` callables (the fakes set them), they are called before
    serving and before shutting down, so handlers that deliberately hang can return at once on stop.
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        lifespan: str = "auto",
        startup_timeout: float = 10.0,
        shutdown_timeout: float = 3.0,
        **config: Any,
    ) -> None:
        self.app = app
        self.host = host
        self.port = 0
        self._lifespan = lifespan
        self._startup_timeout = startup_timeout
        self._shutdown_timeout = shutdown_timeout
        self._config = config
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("LocalServer is not running")
        return f"http://{self.host}:{self.port}"

    def _hook(self, name: str) -> None:
        hook = getattr(getattr(self.app, "state", None), name, None)
        if callable(hook):
            hook()

    def start(self) -> LocalServer:
        if self._thread is not None:
            raise RuntimeError("LocalServer already started")
        self._hook("on_start")
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto is TCP;
        # with proto 0 every keep-alive response suffers a ~40 ms Nagle/delayed-ACK stall.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self._sock = sock
        self.port = sock.getsockname()[1]
        options: dict[str, Any] = {
            "log_level": "warning",
            "lifespan": self._lifespan,
            "ws": "none",
            # In-flight requests (long polls, SSE streams) get this long before being cancelled on stop.
            "timeout_graceful_shutdown": max(0.5, self._shutdown_timeout - 1.0),
            **self._config,
        }
        config = uvicorn.Config(self.app, host=self.host, port=self.port, **options)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"LocalServer:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not server.started:
            if not self._thread.is_alive():
                self._cleanup()
                raise RuntimeError("LocalServer failed to start (see uvicorn log output)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"LocalServer did not start within {self._startup_timeout}s")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._hook("on_stop")
        server.should_exit = True
        thread.join(self._shutdown_timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(self._shutdown_timeout)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_until(condition: Callable[[], object], timeout: float = 2.0, interval: float = 0.01) -> bool:
    """Poll ``condition`` until truthy (returns True) or ``timeout`` elapses (returns False).

    For asserting on things a server thread does asynchronously, e.g. ``wait_until(lambda: fake.cancels)``.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@dataclass
class RecordedRequest:
    """One request as a fake upstream saw it. Header names are lower-cased."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    json: Any = None
    at: float = field(default_factory=time.monotonic)


async def record_request(request: Request) -> RecordedRequest:
    """Snapshot a Starlette request (reads and caches the body; ``json`` is None unless it parses)."""
    body = await request.body()
    parsed: Any = None
    if body and "json" in request.headers.get("content-type", "json"):
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
    return RecordedRequest(
        method=request.method,
        path=request.url.path,
        query=dict(request.query_params),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=body,
        json=parsed,
    )
