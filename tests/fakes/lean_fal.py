"""A lean fake of fal's queue protocol for load: no framework, one `asyncio.Protocol`, jobs that
take `model_seconds` of wall time from their submit.

`FakeFal` (fal.py) is the faithful fake for behaviour; under a burst of thousands of jobs its
framework would be the bottleneck and the measurement would be of the fake. This one answers each
request in tens of microseconds so a burst measures the client (the gateway, or a direct client):

    POST /{owner}/{app}[/...]            -> 200 {request_id, status_url, response_url, cancel_url}
    GET  {status_url}                    -> 202 IN_PROGRESS until model_seconds passed, then 200 COMPLETED
    GET  {status_url}/stream             -> SSE (chunked): `data: {IN_PROGRESS}`, then `data: {COMPLETED}`
                                            when the job is done, then the end of the stream (the
                                            connection stays usable); `stream=False`: 405, as a
                                            deployment without the stream
    GET  {response_url}                  -> 200 {images: [{url, width, height, content_type}], seed, ...}
                                            (202 IN_PROGRESS while the job runs)
    PUT  {cancel_url}                    -> 202 CANCELLATION_REQUESTED
    GET  /files/out.png                  -> a small PNG
    GET  /__stats                        -> what it received (JSON)

Every request but /files and /__stats needs `Authorization: Key <key>` (401 otherwise). HTTP/1.1
keep-alive; bodies by Content-Length only (what httpx and the benchmark clients send).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LeanFal", "LeanFalStats"]

_REASONS = {
    200: b"OK",
    202: b"Accepted",
    401: b"Unauthorized",
    404: b"Not Found",
    400: b"Bad Request",
    405: b"Method Not Allowed",
}
STREAM = -1  # `answer`'s status for "open an SSE stream" (the connection writes it)
MAX_HEAD = 64 * 1024


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(out, format="PNG")
    return out.getvalue()


@dataclass
class LeanFalStats:
    requests: int = 0
    submits: int = 0
    status_polls: int = 0
    streams: int = 0
    results: int = 0
    cancels: int = 0
    files: int = 0
    connections: int = 0  # opened
    open_connections: int = 0
    peak_open_connections: int = 0
    polls_per_job: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        polls = list(self.polls_per_job.values())
        return {
            "requests": self.requests,
            "submits": self.submits,
            "status_polls": self.status_polls,
            "streams": self.streams,
            "results": self.results,
            "cancels": self.cancels,
            "files": self.files,
            "connections": self.connections,
            "peak_open_connections": self.peak_open_connections,
            "polls_per_job_max": max(polls, default=0),
        }


class LeanFal:
    """Start with `await fake.start()` (returns the base URL, no trailing slash), stop with
    `await fake.close()`; `reset()` clears the jobs and the stats."""

    def __init__(
        self, *, key: str, model_seconds: float, host: str = "127.0.0.1", backlog: int = 4096, stream: bool = True
    ) -> None:
        self.key = key
        self.stream = stream
        self.model_seconds = model_seconds
        self.host = host
        self.backlog = backlog
        self.url = ""
        self.stats = LeanFalStats()
        self.jobs: dict[str, float] = {}  # request id -> when it completes
        self._auth = f"key {key}".encode()
        self._server: asyncio.base_events.Server | None = None
        self._png = _png()

    async def start(self, port: int = 0, reuse_port: bool = False) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, port, backlog=self.backlog, reuse_port=reuse_port or None
        )
        bound = self._server.sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{bound}"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def reset(self) -> None:
        self.jobs.clear()
        open_now = self.stats.open_connections
        self.stats = LeanFalStats(open_connections=open_now, peak_open_connections=open_now)

    # -- routing ----------------------------------------------------------------------------

    def answer(self, method: str, path: str, auth: bytes | None, body: bytes) -> tuple[int, bytes, bytes]:
        """(status, content type, body) for one request."""
        stats = self.stats
        stats.requests += 1
        if path == "/__stats":
            return 200, b"application/json", json.dumps(stats.as_dict()).encode()
        if path.startswith("/files/"):
            stats.files += 1
            return 200, b"image/png", self._png
        if auth is None or auth.lower() != self._auth:
            return 401, b"application/json", b'{"detail":"Unauthorized"}'
        parts = path.split("?", 1)[0].strip("/").split("/")
        if method == "POST" and len(parts) >= 2 and "requests" not in parts:
            request_id = uuid.uuid4().hex
            self.jobs[request_id] = time.monotonic() + self.model_seconds
            stats.submits += 1
            root = f"{self.url}/{parts[0]}/{parts[1]}/requests/{request_id}"
            handle = {
                "request_id": request_id,
                "response_url": root,
                "status_url": f"{root}/status",
                "cancel_url": f"{root}/cancel",
                "queue_position": 0,
            }
            return 200, b"application/json", json.dumps(handle).encode()
        if len(parts) >= 4 and parts[2] == "requests":
            request_id = parts[3]
            done_at = self.jobs.get(request_id)
            if done_at is None:
                return 404, b"application/json", b'{"detail":"Request not found"}'
            done = time.monotonic() >= done_at
            tail = parts[4] if len(parts) > 4 else ""
            if method == "GET" and tail == "status" and len(parts) == 5:
                stats.status_polls += 1
                stats.polls_per_job[request_id] += 1
                state = "COMPLETED" if done else "IN_PROGRESS"
                status_body = {"status": state, "request_id": request_id}
                return (200 if done else 202), b"application/json", json.dumps(status_body).encode()
            if method == "GET" and tail == "status" and parts[5:] == ["stream"]:
                stats.streams += 1
                if not self.stream:
                    return 405, b"application/json", b'{"detail":"Method Not Allowed"}'
                return STREAM, b"text/event-stream", request_id.encode()
            if method == "GET" and tail == "":
                stats.results += 1
                if not done:
                    return 202, b"application/json", b'{"status":"IN_PROGRESS"}'
                output = {
                    "images": [
                        {"url": f"{self.url}/files/out.png", "width": 64, "height": 48, "content_type": "image/png"}
                    ],
                    "seed": 42,
                    "has_nsfw_concepts": [False],
                    "prompt": "",
                }
                return 200, b"application/json", json.dumps(output).encode()
            if method == "PUT" and tail == "cancel":
                stats.cancels += 1
                return 202, b"application/json", b'{"status":"CANCELLATION_REQUESTED"}'
        return 404, b"application/json", b'{"detail":"Not Found"}'


class _Connection(asyncio.Protocol):
    def __init__(self, fake: LeanFal) -> None:
        self.fake = fake
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        stats = self.fake.stats
        stats.connections += 1
        stats.open_connections += 1
        stats.peak_open_connections = max(stats.peak_open_connections, stats.open_connections)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake.stats.open_connections -= 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.transport.close()
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            auth: bytes | None = None
            close = False
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "authorization":
                    auth = value.strip().encode()
                elif name == "connection":
                    close = value.strip().lower() == "close"
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, _, rest = head[0].partition(" ")
            path = rest.rsplit(" ", 1)[0]
            status, ctype, payload = self.fake.answer(method, path, auth, body)
            if status == STREAM:
                self._stream(payload.decode())
                continue
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
                % (status, _REASONS.get(status, b"OK"), ctype, len(payload), b"connection: close\r\n" if close else b"")
                + payload
            )
            if close:
                self.transport.close()
                self.transport = None

    def _stream(self, request_id: str) -> None:
        """The status stream: IN_PROGRESS now, COMPLETED when the job is done, then the last chunk."""
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + _event("IN_PROGRESS", request_id)
        )
        done_at = self.fake.jobs.get(request_id, 0.0)
        loop = asyncio.get_running_loop()
        loop.call_later(max(0.0, done_at - time.monotonic()), self._complete, request_id)

    def _complete(self, request_id: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_event("COMPLETED", request_id) + b"0\r\n\r\n")


def _event(status: str, request_id: str) -> bytes:
    """One SSE event as one HTTP chunk."""
    data = b"data: %s\n\n" % json.dumps({"status": status, "request_id": request_id}).encode()
    return b"%x\r\n%s\r\n" % (len(data), data)
