"""An upstream request on the plain path (every call of a job) leaves no reference cycles behind:
with thousands of jobs in flight, every cyclic object per request is work for the garbage
collector, whose pauses stall the event loop (`/healthz`). Checked with the collector off and
`DEBUG_SAVEALL`: what a collection then finds is exactly the cyclic garbage the requests made."""

from __future__ import annotations

import asyncio
import collections
import gc
from collections.abc import AsyncIterator

import httpx
import pytest

from imagegate.upstream_http import upstream_client

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}"
REQUESTS = 100


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(ANSWER)
            await writer.drain()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/status"
    server.close()


async def test_upstream_requests_leave_no_cyclic_garbage(url: str) -> None:
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=5)
    async with upstream_client(limits=limits, timeout=httpx.Timeout(5.0)) as client:

        async def calls() -> None:
            assert (await client.get(url, headers={"Authorization": "Key k"})).json() == {"status": "ok"}
            assert (await client.post(url, json={"prompt": "p"})).status_code == 200
            # (httpx's own path, `client.stream`, is cyclic by httpx's design: a response and its stream)

        for _ in range(5):  # warm: connections open, caches filled
            await calls()
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(REQUESTS):
                await calls()
            gc.collect()
            left = collections.Counter(type(item).__name__ for item in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    # (the plain calls made 16 cyclic objects each while a parser callback raised per answer)
    assert sum(left.values()) <= REQUESTS // 10, left.most_common(8)
