"""The upstream transport keeps httpx's contract: exceptions the adapters branch on, timeouts,
bodies and URLs untouched, nothing added, connections reused and released. Real sockets on
127.0.0.1 (a few lines of asyncio server per case)."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from imagegate.providers.common import never_sent
from imagegate.upstream_http import WireTransport, call_timeout, timeouts, upstream_client

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_head(reader: asyncio.StreamReader) -> list[bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    return head.split(b"\r\n")[:-2]


def _answer(status: int, body: bytes, *extra: bytes) -> bytes:
    lines = [b"HTTP/1.1 %d X" % status, b"content-length: %d" % len(body), *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


def _client(**timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=4)
    return upstream_client(limits=limits, timeout=httpx.Timeout(5.0, **timeout))


async def test_request_goes_out_as_httpx_built_it(serve: Callable[[Handler], Awaitable[str]]) -> None:
    seen: list[list[bytes]] = []
    peers: set[int] = set()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.add(writer.get_extra_info("peername")[1])
        while True:
            try:
                head = await _read_head(reader)
            except asyncio.IncompleteReadError:
                return
            length = next((int(h.split(b":")[1]) for h in head if h.lower().startswith(b"content-length")), 0)
            body = await reader.readexactly(length)
            seen.append([*head, body])
            payload = gzip.compress(b'{"ok": true}')
            writer.write(_answer(200, payload, b"content-encoding: gzip", b"set-cookie: a=b"))
            await writer.drain()

    url = await serve(handler)
    async with _client() as client:
        signed = f"{url}/files/a%2Fb.png?sig=x%2By%3D&e=1"
        first = await client.post(signed, json={"k": 1}, headers={"Authorization": "Key secret"})
        second = await client.get(f"{url}/status")
    assert first.json() == {"ok": True}  # gzip left to httpx, decoded once
    assert first.headers["content-encoding"] == "gzip"
    request_line, *headers, body = seen[0]
    assert request_line == b"POST /files/a%2Fb.png?sig=x%2By%3D&e=1 HTTP/1.1"  # not re-quoted
    names = sorted(h.split(b":")[0].lower() for h in headers)
    assert names == sorted(
        [b"host", b"accept", b"accept-encoding", b"connection", b"user-agent", b"content-length",
         b"content-type", b"authorization"]
    )
    assert b"user-agent: python-httpx" in b"\n".join(h.lower() for h in headers)
    assert body == b'{"k":1}'
    assert second.status_code == 200
    assert not [h for h in seen[1] if h.lower().startswith(b"cookie")]  # the upstream's cookie was not kept
    assert len(peers) == 1  # the second request reused the connection


async def test_refused_connection_is_connect_error_never_sent() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    async with _client() as client:
        with pytest.raises(httpx.ConnectError) as caught:
            await client.post(f"http://127.0.0.1:{port}/submit", json={})
    assert never_sent(caught.value)


async def test_late_answer_is_read_timeout(serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        await asyncio.sleep(2)

    url = await serve(handler)
    async with _client(read=0.2) as client:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await client.post(f"{url}/submit", json={})
    assert not never_sent(caught.value)  # the body went out: fal may have taken the job


async def test_hang_up_is_remote_protocol_error(serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.close()

    url = await serve(handler)
    async with _client() as client:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.post(f"{url}/submit", json={})
    assert not never_sent(caught.value)


async def test_redirects_are_httpx_s_and_partly_read_streams_release(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await _read_head(reader)
            except asyncio.IncompleteReadError:
                return
            if head[0].startswith(b"GET /old"):
                writer.write(_answer(302, b"", b"location: /new"))
            else:
                writer.write(_answer(200, b"x" * 300_000))
            await writer.drain()

    url = await serve(handler)
    async with _client() as client:
        moved = await client.get(f"{url}/old")
        assert moved.status_code == 302  # not followed unless asked
        followed = await client.get(f"{url}/old", follow_redirects=True)
        assert followed.status_code == 200 and len(followed.content) == 300_000
        for _ in range(15):  # more than max_connections: each partly read stream gives its slot back
            async with client.stream("GET", f"{url}/big") as response:
                async for _chunk in response.aiter_bytes():
                    break
        assert (await client.get(f"{url}/big")).status_code == 200


def test_one_client_serves_successive_event_loops() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(_answer(200, b"ok"))
        await writer.drain()
        writer.close()

    client = _client()

    async def once() -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        try:
            response = await client.get(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
            return response.text
        finally:
            server.close()

    assert asyncio.run(once()) == "ok"
    assert asyncio.run(once()) == "ok"


async def test_long_header_lines_pass_as_with_httpcore(serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(_answer(200, b"ok", b"x-long: " + b"a" * 12_000))
        await writer.drain()

    url = await serve(handler)
    async with _client() as client:
        response = await client.get(f"{url}/")
    assert len(response.headers["x-long"]) == 12_000


@pytest.mark.parametrize("values", [(5.0, 5.0, 299.93), (None, None, None), (1.5, 10.0, 0.25), (7, 3, 2)])
def test_the_pool_s_timeouts_are_httpx_s(values: tuple[float | None, float | None, float | None]) -> None:
    pool, connect, read = values
    built = timeouts(pool, connect, read)
    assert (built.pool, built.connect, built.read) == values
    assert timeouts(pool, connect, read) is built  # cached


@pytest.mark.parametrize(("seconds", "connect"), [(299.93, 10.0), (0.5, 0.5), (3, 3)])
def test_a_call_timeout_is_httpx_s(seconds: float, connect: float) -> None:
    built, expected = call_timeout(seconds, connect=connect), httpx.Timeout(seconds, connect=connect)
    assert (built, built.as_dict(), repr(built)) == (expected, expected.as_dict(), repr(expected))
    assert httpx.Timeout(built) == expected  # what httpx makes of it when handed one


async def test_the_gateway_s_client_allows_1000_per_origin_plus_the_fal_stream_slots(tmp_path: Path) -> None:
    """README: at most 1,000 connections per upstream origin plus one per fal status stream slot,
    at most 1,000 idle ones kept, idle ones closed after 4 s (the pool's limits, which the tests of
    upstream_wire hold it to)."""
    from tests.conftest import gateway_settings

    from imagegate.app import create_app

    app = create_app(gateway_settings(tmp_path, providers={"fal": {"status_stream_max": 7}}))
    transport = app.state.http._transport
    assert isinstance(transport, WireTransport)
    pool = transport.pool()
    assert (pool.limit, pool.max_idle, pool.keepalive) == (1007, 1000, 4)
    await app.state.http.aclose()
