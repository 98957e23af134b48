"""The gateway's own HTTP/1.1 pool (`upstream_wire`) against scripted servers on 127.0.0.1: what each
request puts on the wire, how many connections and requests the server sees, which httpx exception
each failure is, and that the pool's slot count (`_Origin.open`) always equals its live connections."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import imagegate.upstream_conn as upstream_conn
import imagegate.upstream_wire as wire
from imagegate.providers.common import never_sent
from imagegate.upstream_http import WireTransport, upstream_client
from imagegate.upstream_plain import UpstreamClient
from imagegate.upstream_wire import Timeouts, WirePool

Handler = Callable[["Conn"], Awaitable[None]]


# -- the server side --


class Conn:
    """One accepted connection, with the requests read from it."""

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server, self.reader, self.writer = server, reader, writer
        self.index = server.accepted
        self.requests: list[bytes] = []  # each as received: head and body bytes (chunked framing kept)
        self.eof = asyncio.Event()

    async def request(self) -> bytes | None:
        """The next request (its raw bytes), or None at the end of the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.lower().split(b"\r\n")
        body = b""
        length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), None)
        if length is not None:
            body = await self.reader.readexactly(length)
        elif any(line.startswith(b"transfer-encoding:") and b"chunked" in line for line in lines):
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.strip(), 16)
                data = await self.reader.readexactly(size + 2)
                body += size_line + data
                if size == 0:
                    break
        raw = head + body
        self.requests.append(raw)
        self.server.requests.append(raw)
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_eof(self) -> None:
        """Read (and drop) whatever comes until the client closes."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.live = 0  # connections the client has not closed yet (as far as the server read)
        self.max_live = 0
        self.conns: list[Conn] = []
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(self, reader, writer)
        self.accepted += 1
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        self.conns.append(conn)
        try:
            await self.handler(conn)
            if not writer.is_closing():
                await conn.until_eof()
        except ConnectionError:
            pass
        finally:
            self.live -= 1
            conn.eof.set()
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[tuple[Server, str]]]]:
    servers: list[Server] = []

    async def start(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> tuple[Server, str]:
        server = Server(handler)
        servers.append(server)
        return server, await server.start(ssl_context)

    yield start
    for server in servers:
        server.close()


def answer(status: int, body: bytes = b"", *extra: bytes) -> bytes:
    lines = [b"HTTP/1.1 %d X" % status, b"content-length: %d" % len(body), *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def keep_alive(conn: Conn) -> None:
    """Answer every request 200 with its request line as the body, until the client closes."""
    while (raw := await conn.request()) is not None:
        await conn.send(answer(200, raw.split(b"\r\n")[0]))


def reset(conn: Conn) -> None:
    """Close with a TCP reset."""
    sock = conn.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.writer.transport.abort()


# -- the client side, and the pool's bookkeeping --


conns: list[Any] = []  # every wire.Connection made during the test


@pytest.fixture(autouse=True)
def track_conns(monkeypatch: pytest.MonkeyPatch) -> None:
    conns.clear()
    made = wire.Connection.connection_made

    def connection_made(self: Any, transport: asyncio.BaseTransport) -> None:
        conns.append(self)
        made(self, transport)

    monkeypatch.setattr(wire.Connection, "connection_made", connection_made)


def client_of(
    max_connections: int = 10, keepalive: float = 5.0, ssl_context: ssl.SSLContext | None = None, **timeout: float
) -> UpstreamClient:
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=keepalive
    )
    if ssl_context is not None:
        return UpstreamClient(transport=WireTransport(limits=limits, ssl_context=ssl_context),
                              timeout=httpx.Timeout(5.0, **timeout))
    client = upstream_client(limits=limits, timeout=httpx.Timeout(5.0, **timeout))
    assert isinstance(client, UpstreamClient)
    return client


def pool_of(client: httpx.AsyncClient) -> WirePool:
    transport = client._transport
    assert isinstance(transport, WireTransport) and transport._pool is not None
    return transport._pool


async def check_slots(pool: WirePool, *servers: Server) -> None:
    """Every origin's slot count is its number of live connections, nobody waits, no read timer
    runs; the servers see as many connections open as the pool has. (Call it with no request in
    flight.)"""
    await asyncio.sleep(0.05)  # closes reach both sides
    total = 0
    for origin in pool.origins.values():
        live = [c for c in conns if c.origin is origin and c.counted]
        assert origin.open == len(live), (origin.open, len(live))
        assert all(c.alive and c.transport is not None and not c.transport.is_closing() for c in live)
        assert not [w for w in origin.waiters if not w.done()]
        assert all(c.timer is None and c.response is None for c in origin.idle if c.alive)
        total += len(live)
    assert not [c for c in conns if c.counted and c.origin.pool is pool and not c.alive]
    scheduled = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
    timers = [
        h for h in scheduled
        if not h.cancelled() and isinstance(getattr(h._callback, "__self__", None), wire.Connection)
    ]
    assert not timers  # no read timer outlives its exchange
    if servers:
        assert sum(server.live for server in servers) == total


async def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


# -- 1. a kept-alive connection the server closed: a POST is never sent twice, a GET is retried once --


async def test_post_on_a_connection_closed_unanswered_is_not_sent_again(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(answer(200, b"first"))
        await conn.request()  # the second request arrives; the server hangs up without a word
        conn.writer.close()

    server, url = await serve(handler)
    async with client_of() as client:
        assert (await client.post(f"{url}/submit", json={"n": 1})).content == b"first"
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.post(f"{url}/submit", json={"n": 2})
        assert not never_sent(caught.value)
        await check_slots(pool_of(client), server)
    assert server.accepted == 1
    assert [r.endswith(b'{"n":2}') for r in server.requests] == [False, True]  # the second POST: once


async def test_post_after_the_server_closed_goes_on_a_new_connection_once(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(answer(200, b"ok"))
        conn.writer.close()  # right after answering

    server, url = await serve(handler)
    async with client_of() as client:
        await client.post(f"{url}/submit", json={"n": 1})
        # racing the close: either the pool knew and used a new connection, or the POST hit the dead one
        try:
            raced = (await client.post(f"{url}/submit", json={"n": 2})).status_code
        except httpx.RemoteProtocolError as exc:
            assert not never_sent(exc)
            raced = 0
        await asyncio.sleep(0.1)  # the close has reached the client: the next POST takes a new connection
        assert (await client.post(f"{url}/submit", json={"n": 3})).status_code == 200
        await check_slots(pool_of(client), server)
    bodies = [r.rsplit(b"\r\n\r\n", 1)[1] for r in server.requests]
    assert bodies.count(b'{"n":2}') == (1 if raced == 200 else 0)  # never twice
    assert bodies.count(b'{"n":3}') == 1
    assert server.accepted == len(server.requests)


async def test_get_on_a_connection_closed_unanswered_is_retried_once_on_a_new_one(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        raw = await conn.request()
        assert raw is not None
        await conn.send(answer(200, raw.split(b" ")[1]))
        await conn.request()
        conn.writer.close()

    server, url = await serve(handler)
    async with client_of() as client:
        assert (await client.get(f"{url}/a")).content == b"/a"
        assert (await client.get(f"{url}/b")).content == b"/b"  # plain path
        async with client.stream("GET", f"{url}/c") as response:  # httpx path (the second connection's 2nd)
            assert await response.aread() == b"/c"
        await check_slots(pool_of(client), server)
    assert server.accepted == 3
    assert [r.split(b" ")[1] for r in server.requests] == [b"/a", b"/b", b"/b", b"/c", b"/c"]


async def test_put_on_a_connection_closed_unanswered_is_retried_once_as_a_get_is(serve: Any) -> None:
    """PUT is idempotent (an upload to storage): sent once more on a new connection, as README says."""

    async def handler(conn: Conn) -> None:
        raw = await conn.request()
        assert raw is not None
        await conn.send(answer(200, raw.split(b" ")[1]))
        await conn.request()
        conn.writer.close()

    server, url = await serve(handler)
    async with client_of() as client:
        assert (await client.put(f"{url}/a", content=b"one")).content == b"/a"
        assert (await client.put(f"{url}/b", content=b"two")).content == b"/b"
        await check_slots(pool_of(client), server)
    assert server.accepted == 2
    assert [r.split(b" ")[:2] for r in server.requests] == [[b"PUT", b"/a"], [b"PUT", b"/b"], [b"PUT", b"/b"]]


async def test_get_retried_on_a_new_connection_that_also_closes_fails(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.send(answer(200, b"ok"))
            await conn.request()
        conn.writer.close()

    server, url = await serve(handler)
    async with client_of() as client:
        await client.get(f"{url}/a")
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"{url}/b")
        await check_slots(pool_of(client), server)
    assert server.accepted == 2  # one retry, not more
    assert len(server.requests) == 3


# -- 2. the per-origin limit and the FIFO queue --


async def test_at_most_max_connections_and_fifo_order(serve: Any) -> None:
    received: list[int] = []

    async def handler(conn: Conn) -> None:
        while (raw := await conn.request()) is not None:
            index = int(raw.split(b" ")[1][1:])
            received.append(index)
            await asyncio.sleep(0.1 if index != 1 else 0.15)
            await conn.send(answer(200, b"%d" % index))

    server, url = await serve(handler)
    async with client_of(max_connections=2) as client:
        tasks = [asyncio.create_task(client.get(f"{url}/{i}")) for i in range(5)]
        await asyncio.sleep(0)
        bodies = [r.content for r in await asyncio.gather(*tasks)]
        assert bodies == [b"0", b"1", b"2", b"3", b"4"]
        await check_slots(pool_of(client), server)
    assert server.accepted == 2 and server.max_live == 2
    assert sorted(received[:2]) == [0, 1] and received[2:] == [2, 3, 4]


async def test_pool_timeout_is_connect_timeout_and_never_sent(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        while (await conn.request()) is not None:
            await asyncio.sleep(0.4)
            await conn.send(answer(200, b"slow"))

    server, url = await serve(handler)
    async with client_of(max_connections=2) as client:
        busy = [asyncio.create_task(client.get(f"{url}/slow")) for _ in range(2)]
        await wait_for(lambda: len(server.requests) == 2)
        with pytest.raises(httpx.ConnectTimeout) as caught:
            await client.post(f"{url}/submit", json={}, timeout=httpx.Timeout(5, pool=0.1))
        assert never_sent(caught.value)
        with pytest.raises(httpx.ConnectTimeout):  # httpx's path too
            await client.post(f"{url}/submit", params={"a": "1"}, timeout=httpx.Timeout(5, pool=0.1))
        assert [r.status_code for r in await asyncio.gather(*busy)] == [200, 200]
        assert (await client.get(f"{url}/after")).status_code == 200
        await check_slots(pool_of(client), server)
    assert not [r for r in server.requests if r.startswith(b"POST")]
    assert server.accepted == 2


# -- 3. keep-alive expiry --


async def test_idle_connection_is_closed_after_keepalive_expiry(serve: Any) -> None:
    server, url = await serve(keep_alive)
    async with client_of(keepalive=0.2) as client:
        await client.get(f"{url}/a")
        await client.get(f"{url}/b")
        assert server.accepted == 1
        await asyncio.sleep(0.5)
        assert server.conns[0].eof.is_set()  # closed by the client, idle
        assert server.live == 0
        pool = pool_of(client)
        assert all(origin.open == 0 and not origin.idle for origin in pool.origins.values())
        await client.get(f"{url}/c")
        assert server.accepted == 2
        await check_slots(pool, server)


# -- 4. bounds --


async def test_endless_response_head_is_cut_off(serve: Any) -> None:
    sent = 0
    finished = False

    async def handler(conn: Conn) -> None:
        nonlocal sent, finished
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nx-endless: ")
        block = b"a" * 65536
        try:
            for _ in range(20 * 16):  # 20 MB
                await conn.send(block)
                sent += len(block)
        except ConnectionError:
            return
        finished = True

    server, url = await serve(handler)
    async with client_of() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"{url}/")
        await wait_for(lambda: server.live == 0)
        await check_slots(pool_of(client), server)
    assert not finished and sent < 16 * 1024 * 1024


@pytest.mark.parametrize("framing", ["length", "chunked", "eof"])
async def test_whole_body_over_max_body_is_refused(
    serve: Any, monkeypatch: pytest.MonkeyPatch, framing: str
) -> None:
    monkeypatch.setattr(upstream_conn, "MAX_BODY", 1000)  # where the connection reads it

    async def handler(conn: Conn) -> None:
        while (raw := await conn.request()) is not None:
            size = 1000 if b"/fits" in raw else 1001
            if framing == "length":
                await conn.send(answer(200, b"b" * size))
            elif framing == "chunked":
                await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                await conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (size, b"b" * size))
            else:
                await conn.send(b"HTTP/1.1 200 OK\r\n\r\n" + b"b" * size)
                conn.writer.close()
                return

    server, url = await serve(handler)
    async with client_of() as client:
        assert len((await client.get(f"{url}/fits")).content) == 1000
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"{url}/over")
        await check_slots(pool_of(client), server)


# -- 5. framing --


async def test_chunked_response_and_the_connection_reused(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        while (await conn.request()) is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await asyncio.sleep(0.01)
            await conn.send(b"A;ext=1\r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\n")

    server, url = await serve(handler)
    async with client_of() as client:
        assert (await client.get(f"{url}/1")).content == b"abc0123456789"
        async with client.stream("GET", f"{url}/2") as response:
            assert [chunk async for chunk in response.aiter_raw()] == [b"abc", b"0123456789"]
        await check_slots(pool_of(client), server)
    assert server.accepted == 1 and len(server.requests) == 2


async def test_body_delimited_by_eof_is_read_whole_and_not_reused(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\n\r\nfirst part, ")
        await asyncio.sleep(0.02)
        await conn.send(b"second part")
        conn.writer.close()

    server, url = await serve(handler)
    async with client_of() as client:
        assert (await client.get(f"{url}/a")).content == b"first part, second part"
        async with client.stream("GET", f"{url}/b") as response:
            assert await response.aread() == b"first part, second part"
        await check_slots(pool_of(client), server)
    assert server.accepted == 2


async def test_body_delimited_by_eof_cut_by_a_reset_is_an_error(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\n\r\npart of it")
        await asyncio.sleep(0.1)
        reset(conn)

    server, url = await serve(handler)
    async with client_of() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"{url}/a")
        await check_slots(pool_of(client), server)


async def test_informational_answers_are_skipped(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        while (await conn.request()) is not None:
            await conn.send(b"HTTP/1.1 100 Continue\r\nx-info: 1\r\n\r\n")
            await asyncio.sleep(0.01)
            await conn.send(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + answer(201, b"made"))

    server, url = await serve(handler)
    async with client_of() as client:
        first = await client.post(f"{url}/a", content=b"x")
        async with client.stream("POST", f"{url}/b", content=b"y") as second:
            await second.aread()
        for response in (first, second):
            assert (response.status_code, response.content) == (201, b"made")
            assert "x-info" not in response.headers and "link" not in response.headers
        await check_slots(pool_of(client), server)
    assert server.accepted == 1


async def test_no_body_statuses_keep_the_connection(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        while (raw := await conn.request()) is not None:
            if b"/204" in raw:
                await conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif b"/304" in raw:
                await conn.send(b"HTTP/1.1 304 Not Modified\r\netag: x\r\n\r\n")
            else:
                await conn.send(answer(200, b"ok"))

    server, url = await serve(handler)
    async with client_of() as client:
        assert (await client.get(f"{url}/204")).status_code == 204
        assert (await client.get(f"{url}/304")).status_code == 304
        async with client.stream("GET", f"{url}/204") as response:
            assert await response.aread() == b""
        assert (await client.get(f"{url}/200")).content == b"ok"
        await check_slots(pool_of(client), server)
    assert server.accepted == 1 and len(server.requests) == 4


async def test_head_completes_without_a_body(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        while (raw := await conn.request()) is not None:
            if raw.startswith(b"HEAD"):
                await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
            else:
                await conn.send(answer(200, b"ok"))

    server, url = await serve(handler)
    async with client_of(read=0.5) as client:
        head = await client.head(f"{url}/a")
        assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "1000")
        async with client.stream("HEAD", f"{url}/a") as response:
            assert await response.aread() == b""
        assert (await client.get(f"{url}/b")).content == b"ok"
        await check_slots(pool_of(client), server)
    assert len(server.requests) == 3


@pytest.mark.parametrize("garbage", [b"HTTPX/9 200 OK\r\n\r\n", b"\x16\x03\x01\x00\x05hello\r\n\r\n",
                                     b"HTTP/1.1 200 OK\r\ncontent-length: zz\r\n\r\n"])
async def test_garbage_answer_is_remote_protocol_error(serve: Any, garbage: bytes) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(garbage)

    server, url = await serve(handler)
    async with client_of() as client:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.post(f"{url}/a", json={})
        assert not never_sent(caught.value)
        await check_slots(pool_of(client), server)
    assert server.live == 0


async def test_switching_protocols_is_remote_protocol_error(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nxyz")

    server, url = await serve(handler)
    async with client_of() as client:
        with pytest.raises(httpx.RemoteProtocolError, match="upgrade"):
            await client.get(f"{url}/a")
        with pytest.raises(httpx.RemoteProtocolError, match="upgrade"):
            await client.get(f"{url}/a", params={"b": "1"})
        await check_slots(pool_of(client), server)
    assert not [r for r in caplog.records if r.name == "asyncio"]  # an answer, not a crash of the protocol
    assert server.accepted == 2


# -- 6. cancellation --


async def test_cancelled_while_waiting_for_the_answer_closes_and_frees_the_slot(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        while (raw := await conn.request()) is not None:
            if b"/slow" not in raw:
                await conn.send(answer(200, b"ok"))

    server, url = await serve(handler)
    async with client_of(max_connections=1) as client:
        async def body() -> AsyncIterator[bytes]:
            yield b"x"

        calls = (
            lambda: client.get(f"{url}/slow"),  # plain path
            lambda: client.post(f"{url}/slow", content=b"x", params={}),  # httpx path
            lambda: client.post(f"{url}/slow", content=body(), params={}),  # httpx path, streamed body
        )
        for call in calls:
            task = asyncio.create_task(call())
            await wait_for(lambda: len(server.requests) % 2 == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(server.conns[-1].eof.wait(), 1)  # that connection was closed
            assert (await client.get(f"{url}/fast")).content == b"ok"
        await check_slots(pool_of(client), server)
    assert server.accepted == 4


async def test_cancelled_as_the_answer_completes_leaves_the_pooled_connection_alone(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task is cancelled in the loop turn its answer completes in: the connection, back in the
    pool and handed to the next waiter, is not closed by the cancelled caller."""
    server, url = await serve(keep_alive)
    victim: list[asyncio.Task[Any]] = []
    received = wire.Connection.data_received

    def data_received(self: Any, data: bytes) -> None:
        if victim:
            victim.pop().cancel()  # its waiter is cancelled before the answer is parsed
        received(self, data)

    monkeypatch.setattr(wire.Connection, "data_received", data_received)
    async with client_of(max_connections=1) as client:
        await client.get(f"{url}/warm")
        first = asyncio.create_task(client.get(f"{url}/first"))
        await asyncio.sleep(0)
        second = asyncio.create_task(client.get(f"{url}/second"))
        victim.append(first)
        with pytest.raises(asyncio.CancelledError):
            await first
        assert (await second).content == b"GET /second HTTP/1.1"
        await check_slots(pool_of(client), server)
    assert server.accepted == 1
    assert len(server.requests) == 3


async def test_cancelled_in_the_queue_is_never_sent(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        while (raw := await conn.request()) is not None:
            await asyncio.sleep(0.2)
            await conn.send(answer(200, raw.split(b" ")[1]))

    server, url = await serve(handler)
    async with client_of(max_connections=1) as client:
        first = asyncio.create_task(client.get(f"{url}/first"))
        queued = asyncio.create_task(client.post(f"{url}/queued", json={}))
        await wait_for(lambda: len(server.requests) == 1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert (await first).content == b"/first"
        assert (await client.get(f"{url}/third")).content == b"/third"
        await check_slots(pool_of(client), server)
    assert server.accepted == 1
    assert [r.split(b" ")[1] for r in server.requests] == [b"/first", b"/third"]


@pytest.mark.parametrize("hand", ["connection", "slot"])
async def test_waiter_cancelled_just_as_it_is_handed_a_connection(
    serve: Any, monkeypatch: pytest.MonkeyPatch, hand: str
) -> None:
    """The connection (or the slot of one closed) handed to a waiter whose task is cancelled before
    it runs goes to the next waiter."""

    async def handler(conn: Conn) -> None:
        while (raw := await conn.request()) is not None:
            await asyncio.sleep(0.1 if b"/first" in raw else 0)
            await conn.send(answer(200, raw.split(b" ")[1], *([b"connection: close"] if hand == "slot" else [])))
            if hand == "slot":
                return

    server, url = await serve(handler)
    victim: list[asyncio.Task[Any]] = []
    original = wire._Origin.release if hand == "connection" else wire._Origin._free_slot

    def handing(self: Any, *args: Any) -> None:
        had = [w for w in self.waiters if not w.done()]
        original(self, *args)
        if had and had[0].done() and victim:
            victim.pop().cancel()  # handed, not yet run

    monkeypatch.setattr(wire._Origin, "release" if hand == "connection" else "_free_slot", handing)
    async with client_of(max_connections=1) as client:
        first = asyncio.create_task(client.get(f"{url}/first"))
        await wait_for(lambda: len(server.requests) == 1)
        second = asyncio.create_task(client.get(f"{url}/second"))
        await asyncio.sleep(0.01)
        third = asyncio.create_task(client.get(f"{url}/third"))
        await asyncio.sleep(0.01)
        victim.append(second)
        assert (await first).content == b"/first"
        with pytest.raises(asyncio.CancelledError):
            await second
        assert (await third).content == b"/third"
        await check_slots(pool_of(client), server)
    assert [r.split(b" ")[1] for r in server.requests] == [b"/first", b"/third"]
    assert server.accepted == (1 if hand == "connection" else 2)


async def test_stream_left_partly_read_frees_its_slot(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        while (raw := await conn.request()) is not None:
            await conn.send(answer(200, b"x" * (1 << 20) if b"/big" in raw else b"small"))

    server, url = await serve(handler)
    async with client_of(max_connections=1, pool=1.0) as client:
        for _ in range(3):
            async with client.stream("GET", f"{url}/big") as response:
                async for _chunk in response.aiter_raw():
                    break
        assert (await client.get(f"{url}/small")).content == b"small"
        await check_slots(pool_of(client), server)
    assert server.accepted == 4  # each partly read stream closed its connection; the last one was kept


# -- 7. streaming backpressure --


async def test_slow_consumer_pauses_the_socket_and_no_read_timeout(serve: Any) -> None:
    size = 20 * 1024 * 1024
    written = 0

    async def handler(conn: Conn) -> None:
        nonlocal written
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        block = b"z" * 65536
        while written < size:
            await conn.send(block)
            written += len(block)

    server, url = await serve(handler)
    async with client_of(read=0.2) as client:
        async with client.stream("GET", f"{url}/big") as response:
            answer_ = response.stream._stream._response  # type: ignore[attr-defined]
            assert isinstance(answer_, wire.WireResponse)
            received = most = 0
            stalls = 0
            async for chunk in response.aiter_raw():
                received += len(chunk)
                most = max(most, answer_._buffered)
                if received > stalls * 6 * 1024 * 1024 and stalls < 3:
                    stalls += 1
                    await asyncio.sleep(0.4)  # twice the read timeout: the consumer is slow, not the server
                    most = max(most, answer_._buffered)
                    assert written < size  # the server is held back
        assert received == size
        assert most <= 2 * wire.HIGH_WATER
        pool = pool_of(client)
        await check_slots(pool, server)
    assert server.accepted == 1


async def test_body_released_while_paused_leaves_a_reusable_connection(serve: Any) -> None:
    """A body whose last bytes push the buffer over HIGH_WATER: the socket is paused as the message
    completes; the connection back in the pool must read again."""
    body = b"q" * (wire.HIGH_WATER + 1)

    async def handler(conn: Conn) -> None:
        while (raw := await conn.request()) is not None:
            await conn.send(answer(200, body if b"/big" in raw else b"small"))

    server, url = await serve(handler)
    async with client_of(read=1.0) as client:
        pool = client._transport.pool()  # type: ignore[attr-defined]
        origin = pool.origin("http", "127.0.0.1", server.port)
        data = b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n"
        response = await pool.request(origin, data, Timeouts(1, 1, 1), whole=False)
        await wait_for(lambda: response._done)  # not consumed meanwhile
        assert b"".join([chunk async for chunk in response.chunks()]) == body
        response.release()
        assert (await asyncio.wait_for(client.get(f"{url}/small"), 2)).content == b"small"
        await check_slots(pool, server)
    assert server.accepted == 1


# -- 8. streamed request bodies --


async def test_streamed_request_body_is_framed_as_httpx_asked(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        while (await conn.request()) is not None:
            await conn.send(answer(200, b"ok"))

    async def parts() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b""
        await asyncio.sleep(0.01)
        yield b"cdef"

    server, url = await serve(handler)
    async with client_of() as client:
        assert (await client.post(f"{url}/chunked", content=parts())).content == b"ok"
        sized = await client.post(f"{url}/sized", content=parts(), headers={"content-length": "6"})
        assert sized.content == b"ok"
        await check_slots(pool_of(client), server)
    chunked, raw = server.requests
    head, body = chunked.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head.lower() and b"content-length" not in head.lower()
    assert body == b"2\r\nab\r\n4\r\ncdef\r\n0\r\n\r\n"
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding" not in head.lower() and body == b"abcdef"
    assert server.accepted == 1


async def test_answer_before_the_body_is_sent_does_not_reuse_the_connection(serve: Any) -> None:
    """The server answers (413, keep-alive) before the request's body is all sent: the rest of the
    body must not go out on a connection back in the pool, nor the next request after it."""
    answered = asyncio.Event()
    seen: list[bytes] = []

    async def handler(conn: Conn) -> None:
        head = await conn.reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n")[0])
        if head.startswith(b"POST"):
            await conn.reader.readexactly(10)
            await conn.send(answer(413, b"too big"))
            answered.set()
            while True:  # what follows on this connection must be requests
                data = await conn.reader.read(65536)
                if not data:
                    return
                seen.append(data.split(b"\r\n")[0])
        else:
            await conn.send(answer(200, b"ok"))

    async def parts() -> AsyncIterator[bytes]:
        yield b"a" * 10
        await answered.wait()
        await asyncio.sleep(0.1)
        yield b"GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"

    server, url = await serve(handler)
    async with client_of() as client:
        response = await client.post(f"{url}/up", content=parts(), headers={"content-length": "100"})
        assert (response.status_code, response.content) == (413, b"too big")
        assert (await client.get(f"{url}/next")).content == b"ok"
        await check_slots(pool_of(client), server)
    assert seen == [b"POST /up HTTP/1.1", b"GET /next HTTP/1.1"]
    assert server.accepted == 2


async def test_answer_head_before_the_body_is_sent_still_has_a_read_timeout(serve: Any) -> None:
    """The head came while the body was being sent; the rest of the answer stalls: ReadTimeout,
    not a wait for ever."""

    async def handler(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab")

    async def parts() -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.sleep(0.1)
        yield b"b"

    server, url = await serve(handler)
    async with client_of(read=0.2) as client:
        async with client.stream("POST", f"{url}/up", content=parts()) as response:
            assert response.status_code == 200
            with pytest.raises(httpx.ReadTimeout):
                await asyncio.wait_for(response.aread(), 2)
        await check_slots(pool_of(client), server)


async def test_streamed_body_the_server_does_not_read_is_write_timeout(serve: Any) -> None:
    failed = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.reader.readuntil(b"\r\n\r\n")
            await failed.wait()  # reads nothing more until the client gave up
        else:
            await keep_alive(conn)

    block = b"w" * (1 << 20)

    async def parts() -> AsyncIterator[bytes]:
        for _ in range(256):
            yield block

    server, url = await serve(handler)
    async with client_of(max_connections=1, write=0.3) as client:
        with pytest.raises(httpx.WriteTimeout) as caught:
            await asyncio.wait_for(client.post(f"{url}/up", content=parts()), 3)
        failed.set()
        assert not never_sent(caught.value)
        assert (await client.get(f"{url}/next")).status_code == 200  # its slot is free
        await check_slots(pool_of(client), server)
    assert server.accepted == 2


async def test_streamed_body_that_fails_closes_its_connection(serve: Any) -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"a"
        raise ValueError("no more")

    server, url = await serve(keep_alive)
    async with client_of(max_connections=1, pool=1.0) as client:
        with pytest.raises(ValueError, match="no more"):
            await client.post(f"{url}/up", content=parts())
        await asyncio.wait_for(server.conns[0].eof.wait(), 1)
        assert (await client.get(f"{url}/next")).status_code == 200
        await check_slots(pool_of(client), server)
    assert server.accepted == 2
    assert [r.split(b" ")[1] for r in server.requests] == [b"/next"]


# -- 9. read timeout between bytes --


async def test_stall_after_the_head_is_read_timeout(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab")

    server, url = await serve(handler)
    async with client_of(read=0.2) as client:
        async with client.stream("GET", f"{url}/") as response:
            assert response.status_code == 200
            with pytest.raises(httpx.ReadTimeout):
                await response.aread()
        with pytest.raises(httpx.ReadTimeout):  # plain path
            await client.get(f"{url}/")
        await check_slots(pool_of(client), server)
    assert server.accepted == 2


async def test_trickled_body_does_not_time_out(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        while (await conn.request()) is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n")
            for byte in b"trickled":
                await asyncio.sleep(0.05)
                await conn.send(bytes([byte]))

    server, url = await serve(handler)
    async with client_of(read=0.2) as client:
        assert (await client.get(f"{url}/")).content == b"trickled"  # 0.4 s in all, 0.05 s between bytes
        async with client.stream("GET", f"{url}/") as response:
            assert await response.aread() == b"trickled"
        await check_slots(pool_of(client), server)
    assert server.accepted == 1


# -- 10. successive event loops --


def test_two_event_loops_each_get_their_pool() -> None:
    client = client_of()
    pools: list[WirePool] = []

    async def once() -> list[bytes]:
        server = Server(keep_alive)
        url = await server.start()
        try:
            bodies = [(await client.get(f"{url}/{i}")).content for i in range(2)]
            pools.append(pool_of(client))
            await check_slots(pools[-1], server)
            assert server.accepted == 1
            return bodies
        finally:
            server.close()

    assert asyncio.run(once()) == [b"GET /0 HTTP/1.1", b"GET /1 HTTP/1.1"]
    assert asyncio.run(once()) == [b"GET /0 HTTP/1.1", b"GET /1 HTTP/1.1"]
    assert pools[0] is not pools[1]


# -- 11. TLS --


def _certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return cert_path, key_path


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, list[str | None]]:
    """A server context for `localhost` recording the SNI names it gets, and a client context trusting it."""
    cert, key = _certificate(tmp_path, "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,func-returns-value]
    client_ctx = ssl.create_default_context(cafile=str(cert))
    return server_ctx, client_ctx, names


async def test_tls_request_with_a_trusted_certificate(serve: Any, tls: Any) -> None:
    server_ctx, client_ctx, names = tls
    server, url = await serve(keep_alive, server_ctx)
    port = server.port
    async with client_of(ssl_context=client_ctx) as client:
        assert (await client.get(f"https://localhost:{port}/a")).content == b"GET /a HTTP/1.1"  # plain path
        assert (await client.get(f"https://localhost:{port}/b", params={"q": "1"})).status_code == 200
        sni = await client.get(f"{url}/c", extensions={"sni_hostname": "localhost"})  # to 127.0.0.1, as localhost
        assert sni.content == b"GET /c HTTP/1.1"
        with pytest.raises(httpx.ConnectError) as caught:  # 127.0.0.1 is not the certificate's name
            await client.get(f"{url}/d")
        assert never_sent(caught.value)
        await check_slots(pool_of(client), server)
    assert names == ["localhost", "localhost", None]  # no SNI for an IP address: the handshake fails
    assert [r.split(b" ")[1] for r in server.requests] == [b"/a", b"/b?q=1", b"/c"]
    assert server.accepted == 2  # localhost (kept for /b), 127.0.0.1 named localhost


async def test_tls_untrusted_certificate_is_connect_error_never_sent(serve: Any, tls: Any) -> None:
    server_ctx, _, _ = tls
    server, url = await serve(keep_alive, server_ctx)
    async with client_of() as client:  # httpx's CA bundle
        with pytest.raises(httpx.ConnectError) as caught:
            await client.post(f"https://localhost:{server.port}/submit", json={})
        assert never_sent(caught.value)
        with pytest.raises(httpx.ConnectError):
            await client.post(f"{url}/submit", json={}, extensions={"sni_hostname": "localhost"})
        await check_slots(pool_of(client))
    assert server.requests == []


# -- WirePool directly: failures after connecting keep the count --


async def test_refused_and_reset_connections_keep_the_slot_count(serve: Any) -> None:
    async def handler(conn: Conn) -> None:
        reset(conn)

    server, url = await serve(handler)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    free = sock.getsockname()[1]
    sock.close()
    async with client_of(max_connections=1) as client:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                await client.post(f"http://127.0.0.1:{free}/submit", json={})
            with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)) as caught:
                await client.post(f"{url}/submit", json={}, timeout=httpx.Timeout(1, pool=0.2))
            assert not isinstance(caught.value, httpx.ConnectTimeout)
        await check_slots(pool_of(client), server)
        pool = pool_of(client)
        assert all(origin.open == 0 for origin in pool.origins.values())

