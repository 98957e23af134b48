"""The HTTP server runtime of `imagegate serve`: uvicorn, configured from `Settings.server`.

- Read timeouts and a connection cap per worker (`imagegate.server.guard`, `.cap`), with `/healthz` and
  `/readyz` still answered when the cap is reached.
- `--workers N`: the listening socket is bound here with `IPPROTO_TCP` and handed to uvicorn's
  supervisor. uvicorn's own `bind_socket()` leaves `proto` at 0, accepted sockets inherit it and
  asyncio then skips `TCP_NODELAY`, so every keep-alive response after the first waited ~40 ms for
  the client's delayed ACK (Kludex/uvicorn#3149).
- The soft open-file limit is raised to the hard one (at most 65,536), and the default cap is
  derived from it, so idle sockets cannot exhaust descriptors before the cap does.
- The accept queue is as deep as the kernel allows, and on Linux several listening sockets
  (`SO_REUSEPORT`) hold a burst as large as the connection cap (`imagegate.server.listen`).
- At most `server.starts_per_tick` new requests start per event-loop iteration; the rest wait in
  order, health checks never (`imagegate.server.pacing`).
- `accept()` failing for lack of descriptors (or any other resource) is logged once per
  `server.log_interval` with a count, not once per event.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from imagegate.observability.logs import uvicorn_log_config
from imagegate.observability.ratelog import RateLimitedLog
from imagegate.server.cap import ConnectionGuard
from imagegate.server.guard import guarded_protocol_class
from imagegate.server.listen import bind_listeners, listen_backlog, listener_count
from imagegate.settings import ServerSettings, Settings

__all__ = ["GatewayConfig", "default_max_connections", "raise_open_file_limit", "serve", "tcp_listener"]

logger = logging.getLogger("imagegate.server")

APP = "imagegate.app:app_from_env"
_NOFILE_TARGET = 65_536
_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at most 65,536); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(hard, _NOFILE_TARGET)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            logger.debug("could not raise the open-file limit from %d", soft)
    return _NOFILE_TARGET if soft == resource.RLIM_INFINITY else soft


def default_max_connections(settings: ServerSettings, open_files: int) -> int:
    """`server.max_connections`, or 3/4 of the open-file limit less the health reserve (at least 16):
    the last quarter is left to upstream connections, storage files and the reserve."""
    if settings.max_connections is not None:
        return settings.max_connections
    return max(16, open_files * 3 // 4 - settings.reserved_connections)


def tcp_listener(sock: socket.socket) -> socket.socket:
    """The same listening socket, re-wrapped with ``proto=IPPROTO_TCP`` (see the module docstring)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.proto == socket.IPPROTO_TCP:
        return sock
    fresh = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
    fresh.set_inheritable(True)
    return fresh


class GatewayConfig(uvicorn.Config):
    """uvicorn's Config plus `server_settings`; pickled into each worker process as it is."""

    def __init__(self, app: Any, *, server_settings: ServerSettings, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.server_settings = server_settings
        self.connection_guard: ConnectionGuard | None = None

    def bind_socket(self) -> socket.socket:
        return tcp_listener(super().bind_socket())

    def load(self) -> None:
        """Runs in the serving process, on its event loop: the guard and the loop's error handler."""
        super().load()
        open_files = raise_open_file_limit()
        cap = default_max_connections(self.server_settings, open_files)
        self.connection_guard = ConnectionGuard(self.server_settings, cap)
        logger.debug("connection cap %d (open-file limit %d)", cap, open_files)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        _rate_limit_resource_errors(loop, self.server_settings.log_interval)


def _rate_limit_resource_errors(loop: asyncio.AbstractEventLoop, interval: float) -> None:
    previous = loop.get_exception_handler()
    exhausted = RateLimitedLog(logger, interval, "%s; %d time(s) since the last report", logging.ERROR)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _EXHAUSTION:
            exhausted.hit(f"{context.get('message', 'resource exhausted')}: {exc.strerror}")
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def build_config(settings: Settings, *, host: str, port: int, workers: int) -> GatewayConfig:
    server = settings.server
    return GatewayConfig(
        APP,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        backlog=listen_backlog(server.backlog),
        loop=server.loop,
        http=guarded_protocol_class(server.http),
        ws="none",
        lifespan="on",
        log_level=settings.log_level,
        access_log=server.access_log,
        timeout_keep_alive=server.keepalive_timeout,  # a float works
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        # uvicorn's own dictConfig for text; None for json, so the handlers `configure_logging`
        # installed stay (in the supervisor and in every worker).
        log_config=uvicorn_log_config(settings),
        server_settings=server,
    )


def serve(settings: Settings, *, host: str, port: int, workers: int) -> int:
    """Run the gateway until interrupted; returns the process exit code."""
    open_files = raise_open_file_limit()  # inherited by worker processes
    config = build_config(settings, host=host, port=port, workers=workers)
    server = uvicorn.Server(config)
    count = listener_count(
        settings.server.listeners, default_max_connections(settings.server, open_files), config.backlog
    )
    sockets: list[socket.socket] | None = None
    if count > 1:
        try:
            sockets = bind_listeners(host, port, count, config.backlog)
        except OSError as exc:
            logger.error("cannot listen on %s:%d: %s", host, port, exc)
            return 3
    if workers > 1:
        sockets = sockets or [config.bind_socket()]
        try:
            supervisor = Multiprocess(config, sockets=sockets)
        except TypeError:  # uvicorn before 0.50 also takes the worker's target
            supervisor = Multiprocess(config, target=server.run, sockets=sockets)  # type: ignore[call-arg]
        supervisor.run()
        return 0
    server.run(sockets=sockets)
    return 0 if server.started else 3
