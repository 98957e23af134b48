"""`GET /healthz` is answered inside the read callback that completes its headers (server/guard.py):
written before the loop runs anything already queued, by the same app (same status, headers and
body as a request started in a task), and the connection stays a normal keep-alive connection.
Anything else still starts in a task; a health check whose app waits on something finishes in one."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import gateway_settings
from uvicorn.server import ServerState

from imagegate.app import create_app
from imagegate.server import GatewayConfig
from imagegate.server.guard_httptools import GuardedHttpToolsProtocol
from imagegate.settings import ServerSettings

HEALTHZ = b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n"
MODELS = b"GET /v1/models HTTP/1.1\r\nhost: gateway\r\n\r\n"
_RESPONSE_HEAD = re.compile(rb"HTTP/1.1 200 OK\r\n(?:[^\r]+\r\n)*?content-length: (\d+)\r\n(?:[^\r]+\r\n)*\r\n")


class _Watched(GuardedHttpToolsProtocol):
    """Records what the client had received when each read callback returned."""

    peer: socket.socket
    at_return: list[bytes]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        try:
            self.at_return.append(self.peer.recv(65536, socket.MSG_DONTWAIT))
        except BlockingIOError:
            self.at_return.append(b"")


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Any]:
    gateway = create_app(gateway_settings(tmp_path))
    async with gateway.router.lifespan_context(gateway):
        yield gateway


async def _serve(app: Any, uvicorn: dict[str, Any] | None = None, **server: Any) -> tuple[
    _Watched, socket.socket, ServerState
]:
    """The guarded httptools protocol on one end of a socket pair; the client's end, non-blocking."""
    config = GatewayConfig(app, server_settings=ServerSettings(**server), log_level="warning", lifespan="off",
                           **(uvicorn or {}))
    config.load()
    state = ServerState()
    protocol = _Watched(config, state, app_state={})
    ours, client = socket.socketpair()
    protocol.peer, protocol.at_return = client, []
    await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, ours)
    client.setblocking(False)
    return protocol, client, state


async def _ok(send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _response(client: socket.socket, protocol: _Watched) -> bytes:
    """One whole response (content-length framed), whether a read callback or this saw it first."""
    data = b""
    while True:
        data += b"".join(protocol.at_return)
        protocol.at_return.clear()
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head)
        if length is not None and len(body) >= int(length.group(1)):
            return data
        await asyncio.sleep(0.001)
        with contextlib.suppress(BlockingIOError):
            data += client.recv(65536)


def _normal(response: bytes) -> bytes:
    return re.sub(rb"(date|x-request-id): [^\r]*", rb"\1: -", response)


async def test_healthz_is_written_inside_the_read_callback(app: Any) -> None:
    protocol, client, state = await _serve(app)
    client.send(HEALTHZ)
    async with asyncio.timeout(5):
        while not protocol.at_return:
            await asyncio.sleep(0.001)
    eager = protocol.at_return[0]
    assert eager.startswith(b"HTTP/1.1 200 OK\r\n") and eager.endswith(b'{"status":"ok"}')
    assert not state.tasks
    client.send(MODELS)  # any other request: a task, answered in a later iteration
    async with asyncio.timeout(5):
        while len(protocol.at_return) < 2:
            await asyncio.sleep(0.001)
    assert protocol.at_return[1] == b""
    assert (await _response(client, protocol)).startswith(b"HTTP/1.1 200 OK\r\n")
    client.close()


async def test_eager_healthz_is_the_response_a_task_gives(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = []
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr("imagegate.server.guard.EAGER_PATH", "/none")
        protocol, client, _ = await _serve(app)
        client.send(HEALTHZ)
        async with asyncio.timeout(5):
            answers.append(_normal(await _response(client, protocol)))
        client.close()
    assert answers[0] == answers[1]
    assert b"x-request-id: -" in answers[0] and b"content-type: application/json" in answers[0]


async def test_keep_alive_after_an_eager_answer_is_not_cut_as_slow_headers(app: Any) -> None:
    """After the eager answer the connection is idle (uvicorn's keep-alive timer), not a request
    whose headers are late: it is still open after the header timeout and answers again."""
    protocol, client, _ = await _serve(app, header_timeout=0.2, keepalive_timeout=5)
    for _ in range(2):
        client.send(HEALTHZ)
        async with asyncio.timeout(5):
            assert (await _response(client, protocol)).startswith(b"HTTP/1.1 200 OK\r\n")
        await asyncio.sleep(0.5)
    assert not protocol.transport.is_closing()
    client.close()


async def test_a_health_check_that_waits_finishes_in_a_task(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await gate.wait()
        await _ok(send)

    protocol, client, state = await _serve(app)
    client.send(HEALTHZ)
    async with asyncio.timeout(5):
        while not state.tasks:
            await asyncio.sleep(0.001)
        gate.set()
        assert (await _response(client, protocol)).endswith(b"\r\n\r\nok")
        while state.tasks:
            await asyncio.sleep(0.001)
    client.close()


@pytest.mark.parametrize("reset", [False, True])
async def test_eager_healthz_runs_in_the_context_a_task_would(reset: bool) -> None:
    """A copy of the protocol's context, or a fresh one with uvicorn's `reset_contextvars`; what
    the app sets there stays there."""
    probe: contextvars.ContextVar[str] = contextvars.ContextVar("probe", default="unset")
    probe.set("outer")
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(probe.get())
        probe.set("inner")
        await _ok(send)

    protocol, client, _ = await _serve(app, {"reset_contextvars": reset})
    client.send(HEALTHZ)
    async with asyncio.timeout(5):
        assert (await _response(client, protocol)).endswith(b"\r\n\r\nok")
    assert seen == ["unset" if reset else "outer"] and probe.get() == "outer"
    client.close()


async def test_a_request_pipelined_after_an_eager_answer_is_not_cut_by_the_keep_alive_timer() -> None:
    """`GET /healthz` and a slow request in one read: the health check's answer arms uvicorn's
    keep-alive timer, and the request parsed after it in the same read must disarm it (as a
    request started from the pipeline does), or the connection is closed under the request."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] != "/healthz":
            await asyncio.sleep(0.5)
        await _ok(send)

    protocol, client, _ = await _serve(app, {"timeout_keep_alive": 0.1})
    client.send(HEALTHZ + b"POST /slow HTTP/1.1\r\nhost: gateway\r\ncontent-length: 2\r\n\r\nhi")
    async with asyncio.timeout(5):
        first = await _response(client, protocol)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\nok")
        second = await _response(client, protocol)
    assert second.startswith(b"HTTP/1.1 200 OK\r\n") and second.endswith(b"\r\n\r\nok")
    assert not protocol.transport.is_closing()
    client.close()


async def test_health_checks_queued_behind_a_request_are_all_answered_in_order() -> None:
    """Health checks pipelined behind a request run in a task start from uvicorn's pipeline when it
    completes, one after another: they are started as tasks there (not eagerly, each inside the
    last one's answer, which nests a call per check and overflows the stack)."""
    count = 2000

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] != "/healthz":
            await asyncio.sleep(0.05)
        body = scope["path"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    protocol, client, _ = await _serve(app)
    loop = asyncio.get_running_loop()
    first = b"GET /first HTTP/1.1\r\nhost: gateway\r\n\r\n"
    sending = loop.create_task(loop.sock_sendall(client, first + HEALTHZ * count))
    bodies: list[bytes] = []
    data = b""
    async with asyncio.timeout(20):
        while len(bodies) < count + 1:
            data += b"".join(protocol.at_return)
            protocol.at_return.clear()
            with contextlib.suppress(BlockingIOError):
                data += client.recv(1 << 20)
            while (match := _RESPONSE_HEAD.match(data)) is not None and len(data) >= match.end() + int(match.group(1)):
                end = match.end() + int(match.group(1))
                bodies.append(data[match.end():end])
                data = data[end:]
            assert not protocol.transport.is_closing()
            await asyncio.sleep(0.001)
    assert bodies == [b"/first"] + [b"/healthz"] * count
    await sending
    client.close()
