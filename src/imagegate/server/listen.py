"""The listening sockets of `imagegate serve`: an accept queue as deep as the kernel allows, and
enough of them to hold a burst as large as the connection cap.

A connection the kernel has completed but the process has not yet accepted waits in the listening
socket's accept queue, whose depth is `listen(backlog)` clamped to `net.core.somaxconn` (4096 on
current kernels; uvicorn asks for 2048). While the event loop is busy (thousands of requests
starting at once) it accepts only between callbacks; once the queue is full the kernel drops the
client's handshake ACK, and a connection that stays out of the queue past the SYN-ACK retries is
reset (`ConnectionResetError` at the client, before the gateway ever saw it). Measured: 731 of a
10,000-request burst against one 4096-deep queue.

So `serve` asks for the kernel's maximum (`server.backlog`, default `somaxconn`) and, on Linux,
binds `server.listeners` sockets to the same address with `SO_REUSEPORT` (default: as many as it
takes for their queues together to hold `max_connections`, at most 8). The kernel spreads new
connections over them and the one event loop accepts from all. Before the group is bound the
address is checked with a plain bind, so a second gateway started on a port already in use fails
as before instead of silently sharing it.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

__all__ = ["MAX_LISTENERS", "bind_listeners", "listen_backlog", "listener_count", "somaxconn"]

logger = logging.getLogger("imagegate.server")

MAX_LISTENERS = 8
_FALLBACK_SOMAXCONN = 4096
_SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def somaxconn() -> int:
    """The kernel's cap on one accept queue (`net.core.somaxconn`; 4096 where it cannot be read)."""
    try:
        return max(1, min(int(_SOMAXCONN.read_text().strip()), 65_535))
    except (OSError, ValueError):
        return _FALLBACK_SOMAXCONN


def listen_backlog(configured: int | None) -> int:
    """`server.backlog`, or the kernel's maximum."""
    return configured if configured is not None else somaxconn()


def reuseport_supported() -> bool:
    """SO_REUSEPORT spreads connections over the sockets of a group only on Linux."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def listener_count(configured: int | None, max_connections: int, backlog: int) -> int:
    """`server.listeners`, or enough accept queues of depth min(backlog, somaxconn) to hold
    `max_connections` (at least 1, at most MAX_LISTENERS); 1 where SO_REUSEPORT cannot spread."""
    if not reuseport_supported():
        return 1
    if configured is not None:
        return configured
    depth = max(1, min(backlog, somaxconn()))
    return max(1, min(MAX_LISTENERS, -(-max_connections // depth)))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _check_free(host: str, port: int) -> None:
    """A plain bind (as uvicorn's): EADDRINUSE if anything listens there, a SO_REUSEPORT group included."""
    with socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def bind_listeners(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """`count` TCP sockets bound to (host, port) with SO_REUSEPORT, listening with `backlog`,
    inheritable (for `--workers`), `proto=IPPROTO_TCP` (so accepted sockets get TCP_NODELAY).
    Port 0: the first socket's port is used for the rest."""
    if port:
        _check_free(host, port)
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.set_inheritable(True)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    address = f"[{host}]" if ":" in host else host
    # uvicorn's own start-up line (it logs none for sockets handed to it), then the queues.
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", address, port)
    logger.info("%d listening socket(s), accept queue %d each", count, backlog)
    return sockets
