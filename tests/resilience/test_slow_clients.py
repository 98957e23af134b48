"""Slow, idle and too many clients against a real `imagegate serve` process on 127.0.0.1.

Each test starts the CLI in a subprocess with short timeouts (environment settings) and talks to
it with raw sockets, so the bytes on the wire are exactly what a slow or idle client sends.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from imagegate.server.cap import EVICTABLE_AFTER

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
BODY_MIN_RATE = 2_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock

    def healthz(self, timeout: float = 2.0) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=timeout)

    def log_text(self) -> str:
        return self.log.read_text("utf-8", errors="replace")


@contextmanager
def serve(tmp_path: Path, *, workers: int = 1, nofile: int | None = None, **server: object) -> Iterator[Served]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGATE_")}
    env |= {
        "IMAGEGATE_STORAGE__PATH": str(tmp_path / "images"),
        "IMAGEGATE_SERVER__HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "IMAGEGATE_SERVER__BODY_TIMEOUT": str(BODY_TIMEOUT),
        "IMAGEGATE_SERVER__BODY_MIN_RATE": str(BODY_MIN_RATE),
        "IMAGEGATE_SERVER__LOG_INTERVAL": "30",
    }
    env |= {f"IMAGEGATE_SERVER__{k.upper()}": str(v) for k, v in server.items()}
    log = tmp_path / f"serve-{port}.log"

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imagegate.cli", "serve", "--port", str(port), "--workers", str(workers)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_files,
        )
    served = Served(proc, port, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            with suppress(httpx.HTTPError):
                if served.healthz(timeout=0.5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"imagegate serve did not start:\n{served.log_text()}")
            time.sleep(0.1)
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read_until_closed(sock: socket.socket, timeout: float, *, reset_ok: bool = True) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when (seconds from now). Raises
    TimeoutError if the server keeps the connection open `timeout` seconds (and
    ConnectionResetError on a reset, unless `reset_ok`)."""
    start = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        if not reset_ok:
            raise
    return data, time.monotonic() - start


def _dribble(sock: socket.socket, data: bytes, interval: float, stop_after: float) -> float:
    """Send `data` one byte per `interval` until done, refused, or `stop_after` seconds; returns when it stopped."""
    start = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        if time.monotonic() - start > stop_after:
            break
        time.sleep(interval)
    return time.monotonic() - start


def _status_and_error(response: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def _assert_healthy(served: Served) -> None:
    started = time.monotonic()
    response = served.healthz()
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert time.monotonic() - started < 2.0


@pytest.fixture(params=["httptools", "h11"])
def gateway(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    """The server with each HTTP parser it supports (the guards wrap both)."""
    with serve(tmp_path, http=request.param) as served:
        yield served


def test_idle_socket_is_closed_at_the_header_timeout(gateway: Served) -> None:
    connected = time.monotonic()
    sockets = [gateway.connect() for _ in range(20)]
    _assert_healthy(gateway)  # while 20 sockets sit idle
    data, _ = _read_until_closed(sockets[0], timeout=HEADER_TIMEOUT + 5)
    assert data == b""  # nothing was asked: closed without a response
    assert HEADER_TIMEOUT - 0.1 < time.monotonic() - connected < HEADER_TIMEOUT + 2
    for sock in sockets[1:]:
        assert _read_until_closed(sock, timeout=2)[0] == b""
        sock.close()


def test_slow_headers_get_408_at_the_header_timeout(gateway: Served) -> None:
    sock = gateway.connect()
    request = b"GET /healthz HTTP/1.1\r\nhost: x\r\nuser-agent: " + b"a" * 200 + b"\r\n\r\n"
    sent_for = _dribble(sock, request, interval=0.1, stop_after=HEADER_TIMEOUT + 3)
    response, _ = _read_until_closed(sock, timeout=3)
    assert sent_for < HEADER_TIMEOUT + 2  # cut near the timeout, long before the 22 s the headers would take
    status, error = _status_and_error(response)
    assert status == 408 and error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    _assert_healthy(gateway)


def test_slow_body_gets_408_and_the_app_stops_waiting(gateway: Served) -> None:
    sock = gateway.connect()
    body = json.dumps({"model": "sandbox-image", "prompt": "a lighthouse"}).encode()
    sock.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    started = time.monotonic()
    _dribble(sock, body, interval=0.2, stop_after=BODY_TIMEOUT + 3)  # 5 bytes/s, far below 2,000
    response, _ = _read_until_closed(sock, timeout=3)
    # body_timeout plus one second per BODY_MIN_RATE bytes received (here < 0.01 s)
    assert time.monotonic() - started < BODY_TIMEOUT + 2
    status, error = _status_and_error(response)
    assert status == 408 and error["code"] == "request_timeout"
    _assert_healthy(gateway)
    log = gateway.log_text()
    assert "Traceback" not in log and "unhandled error" not in log


def test_a_body_arriving_at_the_minimum_rate_is_not_cut(gateway: Served) -> None:
    """The body deadline grows with what arrived: 4 kB/s for ~2 s outlives body_timeout=1 s."""
    payload = {"model": "sandbox-image", "prompt": "a lighthouse " + "x" * 8000, "size": "256x256"}
    body = json.dumps(payload).encode()
    sock = gateway.connect()
    sock.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    started = time.monotonic()
    for i in range(0, len(body), 400):
        sock.sendall(body[i : i + 400])
        time.sleep(0.1)
    assert time.monotonic() - started > BODY_TIMEOUT + 0.5
    response, _ = _read_until_closed(sock, timeout=30)
    head = response.split(b"\r\n", 1)[0]
    assert b" 200 " in head, response[:300]


def test_keepalive_connection_is_closed_after_the_keepalive_timeout(tmp_path: Path) -> None:
    with serve(tmp_path, keepalive_timeout=0.5) as gateway:
        sock = gateway.connect()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        data, waited = _read_until_closed(sock, timeout=5)
        assert data == b"" and 0.4 < waited < 2.5


def test_connection_cap_keeps_healthz_answering_and_logs_once(tmp_path: Path) -> None:
    cap, reserve = 20, 4
    with serve(tmp_path, max_connections=cap, reserved_connections=reserve, header_timeout=20) as gateway:
        # 1) idle sockets beyond the cap evict the oldest idle ones: health checks still get through
        idle = [gateway.connect() for _ in range(cap)]
        time.sleep(EVICTABLE_AFTER + 0.2)
        idle += [gateway.connect() for _ in range(cap)]
        _assert_healthy(gateway)
        assert _read_until_closed(idle[0], timeout=2)[0] == b""  # the oldest was evicted

        # 2) the cap filled with requests in progress (headers half sent: not idle, not evictable)
        time.sleep(EVICTABLE_AFTER + 0.2)
        busy = []
        for _ in range(cap):
            busy.append(gateway.connect())
            busy[-1].sendall(b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\n")
        time.sleep(0.3)
        _assert_healthy(gateway)  # admitted from the reserve
        extra = gateway.connect()
        extra.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        response, _ = _read_until_closed(extra, timeout=3)
        status, error = _status_and_error(response)
        assert status == 503 and error["code"] == "server_busy"
        assert b"retry-after: 1" in response.lower()

        # 3) the reserve full too: new connections get 503 server_busy at once, unread, and are
        #    closed (never reset); a flood is logged once
        hold = [gateway.connect() for _ in range(reserve)]
        for sock in hold:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.3)
        refused = 0
        for i in range(100):
            sock = gateway.connect()
            if i % 2:  # half of them have sent their request already
                sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
            response, took = _read_until_closed(sock, timeout=3, reset_ok=False)
            status, error = _status_and_error(response)
            refused += status == 503 and error["code"] == "server_busy" and b"retry-after: 1" in response and took < 1
            sock.close()
        assert refused == 100, gateway.log_text()[-3000:]
        for sock in [*idle, *busy, *hold]:
            sock.close()
        time.sleep(0.3)
        _assert_healthy(gateway)  # capacity is back once they are gone
        log = gateway.log_text()
        assert log.count("reserve are full") == 1
        assert log.count("idle connection(s) to admit") <= 2


def test_low_file_limit_many_idle_sockets(tmp_path: Path) -> None:
    """Issue: with a low file limit, 250 idle connections made /healthz time out and flooded the log."""
    with serve(tmp_path, nofile=256, header_timeout=30) as gateway:
        idle = [gateway.connect() for _ in range(300)]  # beyond cap + reserve: some are closed at once
        time.sleep(EVICTABLE_AFTER + 0.2)
        for _ in range(5):
            _assert_healthy(gateway)
        for sock in idle:
            sock.close()
        log = gateway.log_text()
        assert "Too many open files" not in log
        assert len(log.splitlines()) < 20, log[-2000:]


def test_workers_keep_tcp_nodelay(tmp_path: Path) -> None:
    """`--workers 2`: keep-alive responses are not held back by Nagle + delayed ACK (~40 ms each).

    On the asyncio loop, which sets TCP_NODELAY only on sockets whose proto is TCP (uvloop sets it anyway)."""
    with (
        serve(tmp_path, workers=2, loop="asyncio") as gateway,
        httpx.Client(base_url=f"http://127.0.0.1:{gateway.port}") as client,
    ):
        client.get("/healthz")
        times = []
        for _ in range(20):
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            times.append(time.perf_counter() - started)
        assert statistics.median(times) < 0.02, times


def test_accept_out_of_file_descriptors_is_logged_once_per_interval(tmp_path: Path) -> None:
    """A cap set above the file limit (a misconfiguration): accept() fails with EMFILE about once a
    second (asyncio retries it), and the log reports it once per `log_interval`, with a count."""
    with serve(tmp_path, nofile=128, max_connections=1000, header_timeout=30, loop="asyncio") as gateway:
        sockets = []
        for _ in range(250):
            with suppress(OSError):
                sockets.append(gateway.connect())
        time.sleep(3.5)
        for sock in sockets:
            sock.close()
        time.sleep(0.5)
        _assert_healthy(gateway)  # descriptors are back: it serves again
        log = gateway.log_text()
        assert log.count("out of system resource: Too many open files") == 1, log[-2000:]
        assert "Traceback" not in log
