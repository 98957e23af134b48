"""A lean HTTP/1.1 load client on asyncio streams: keep-alive connections in a per-host pool, no
framework. It is the physical baseline of the benchmarks: it must cost the machine far less per
request than anything it measures (the suite reports its CPU per request to show it).

Also the request shapes the suite sends: fal's queue protocol and sync run driven directly, and
one OpenAI images request to a gateway (imagegate or LiteLLM).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Client", "LoadResult", "burst", "closed_loop"]

FAL_AUTH = "Key test-fal-key"
MODEL_PATH = "fal-ai/qwen-image"


class HTTPStatusError(Exception):
    pass


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(
        self, method: str, target: str, host: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        head = f"{method} {target} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(head.encode() + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if chunked:
            data = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                data += await self.reader.readexactly(size + 2)
                data = data[:-2]
        elif length is not None:
            data = await self.reader.readexactly(length)
        else:
            data = await self.reader.read()
            close = True
        if close:
            self.writer.close()
        return status, data


class Client:
    """Keep-alive connections per host; a connection serves one request at a time."""

    def __init__(self, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self.opened = 0

    async def request(
        self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        parts = urlsplit(url)
        key = (parts.hostname or "127.0.0.1", parts.port or 80)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        payload = b"" if body is None else json.dumps(body).encode()
        hdrs = dict(headers or {})
        if body is not None:
            hdrs["content-type"] = "application/json"
        idle = self._idle.setdefault(key, [])
        while True:
            reused = bool(idle)
            conn = idle.pop() if idle else None
            if conn is None:
                reader, writer = await asyncio.open_connection(*key, limit=2**24)
                conn = _Conn(reader, writer)
                self.opened += 1
            try:
                status, data = await asyncio.wait_for(
                    conn.request(method, target, f"{key[0]}:{key[1]}", payload, hdrs), self.timeout
                )
            except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
                conn.writer.close()
                if reused:  # the server closed an idle keep-alive connection: what every client retries
                    continue
                raise
            except BaseException:
                conn.writer.close()
                raise
            if not conn.writer.is_closing():
                idle.append(conn)
            return status, data

    async def json(
        self,
        method: str,
        url: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> Any:
        status, data = await self.request(method, url, body, headers)
        if status not in ok:
            raise HTTPStatusError(f"{method} {url} -> {status}: {data[:200]!r}")
        return json.loads(data)

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.writer.close()
        self._idle.clear()


# -- request shapes ------------------------------------------------------------------------------


def direct_queue(
    client: Client, fal: str, *, poll: float = 0.005, poll_max: float = 0.05, payload: dict[str, Any] | None = None
) -> Callable[[], Awaitable[int]]:
    """fal's queue protocol straight at the fake: submit, poll status (the gateway's schedule:
    at once, then `poll` growing x1.5 up to `poll_max`, +-25% jitter), fetch the result."""
    body = payload or {"prompt": "a lighthouse at dusk", "num_images": 1}
    auth = {"authorization": FAL_AUTH}

    async def once() -> int:
        sub = await client.json("POST", f"{fal}/{MODEL_PATH}", body, auth)
        delay, upstream = poll, 1
        while True:
            status, _ = await client.request("GET", sub["status_url"], None, auth)
            upstream += 1
            if status == 200:
                break
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(poll_max, delay * 1.5)
        result = await client.json("GET", sub["response_url"], None, auth)
        assert result["images"][0]["url"]
        return upstream + 1

    return once


def direct_sync(client: Client, fal: str) -> Callable[[], Awaitable[int]]:
    """fal's sync run straight at the fake (`POST {run_url}/{model}`): one request per job."""
    body = {"prompt": "a lighthouse at dusk", "num_images": 1}

    async def once() -> int:
        result = await client.json("POST", f"{fal}/sync/{MODEL_PATH}", body, {"authorization": FAL_AUTH})
        assert result["images"][0]["url"]
        return 1

    return once


def openai_images(
    client: Client,
    base: str,
    *,
    model: str = "qwen-image",
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Callable[[], Awaitable[int]]:
    """`POST {base}/v1/images/generations` as the OpenAI SDK sends it."""
    body = {"model": model, "prompt": "a lighthouse at dusk", "n": 1, **(extra or {})}

    async def once() -> int:
        result = await client.json("POST", f"{base}/v1/images/generations", body, headers)
        item = result["data"][0]
        assert item.get("url") or item.get("b64_json")
        return 1

    return once


# -- load shapes ---------------------------------------------------------------------------------


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    client_cpu: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def p(self, q: float) -> float:
        if not self.latencies:
            return math.nan
        data = sorted(self.latencies)
        pos = (len(data) - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        return data[lo] + (data[hi] - data[lo]) * (pos - lo)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall if self.wall else 0.0


def _cpu() -> float:
    import os

    t = os.times()
    return t.user + t.system


async def closed_loop(
    once: Callable[[], Awaitable[int]], *, concurrency: int, requests: int, max_seconds: float, warmup: int = 10
) -> LoadResult:
    """`concurrency` workers send `requests` in all (or until `max_seconds`), after `warmup`."""
    for _ in range(warmup):
        with contextlib.suppress(Exception):
            await once()
    result = LoadResult()
    remaining = requests
    stop_at = time.monotonic() + max_seconds

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < stop_at:
            remaining -= 1
            started = time.perf_counter()
            try:
                await once()
            except Exception as exc:  # counted, reported
                result.errors.append(repr(exc)[:200])
            else:
                result.latencies.append(time.perf_counter() - started)

    cpu, started = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall, result.client_cpu = time.perf_counter() - started, _cpu() - cpu
    return result


async def burst(once: Callable[[], Awaitable[int]], *, k: int, timeout: float) -> LoadResult:
    """`k` requests fired at once; each must finish within `timeout`."""
    result = LoadResult()

    async def one() -> None:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(once(), timeout)
        except Exception as exc:
            result.errors.append(repr(exc)[:200])
        else:
            result.latencies.append(time.perf_counter() - started)

    cpu, started = _cpu(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(k)))
    result.wall, result.client_cpu = time.perf_counter() - started, _cpu() - cpu
    return result


async def interleaved(
    onces: dict[str, Callable[[], Awaitable[int]]], *, requests: int, max_seconds: float, warmup: int = 10
) -> dict[str, LoadResult]:
    """One request at a time, rotating over the targets (the order shifts every round), so that
    drift on a shared machine hits every target alike: the fair way to compare latencies at c=1."""
    names = list(onces)
    for _ in range(warmup):
        for name in names:
            with contextlib.suppress(Exception):
                await onces[name]()
    results = {name: LoadResult() for name in names}
    stop_at = time.monotonic() + max_seconds
    cpu = _cpu()
    for i in range(requests):
        if time.monotonic() > stop_at:
            break
        for name in names[i % len(names) :] + names[: i % len(names)]:
            begun = time.perf_counter()
            try:
                await onces[name]()
            except Exception as exc:
                results[name].errors.append(repr(exc)[:200])
            else:
                results[name].latencies.append(time.perf_counter() - begun)
    client_cpu = _cpu() - cpu
    for result in results.values():
        result.wall = sum(result.latencies)
        result.client_cpu = client_cpu / len(names)
    return results
