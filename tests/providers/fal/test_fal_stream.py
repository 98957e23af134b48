"""fal's status stream on the shared upstream client is read straight from its pool (`StatusStream`'s
plain path): byte for byte the request httpx's `stream()` sends, the same events, the same log line
and the same verdicts (COMPLETED, UNSUPPORTED remembered, BROKEN) for every answer, compared here
with httpx's own path on the same client and the same scripted answers."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest

from imagegate.providers.fal.progress import ProgressReporter
from imagegate.providers.fal.stream import MAX_EVENT_CHARS, StatusStream, StreamMiss, _Events, stream_url
from imagegate.upstream_http import upstream_client

HEADERS = {"Authorization": "Key k", "Accept": "text/event-stream", "User-Agent": "imagegate (fal adapter)"}
PATH = "/fal-ai/app/requests/r1/status/stream?logs=1"
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _event(**body: Any) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _chunked(*pieces: bytes) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces]


DONE = json.dumps({"status": "COMPLETED", "request_id": "r1", "note": "é ☃"}).encode()
# Each answer: the pieces the server writes, one at a time (a short pause between them).
ANSWERS: dict[str, list[bytes]] = {
    "sse": [
        SSE_HEAD,
        *_chunked(_event(status="IN_QUEUE", queue_position=2), b": keep-alive\n\n",
                  _event(status="IN_PROGRESS", logs=[{"message": "step 1"}])),
        *_chunked(b"event: status\r\ndata: " + DONE[:20], DONE[20:31], DONE[31:] + b"\r", b"\n\r\n", b"data: {}\n\n"),
        b"0\r\n\r\n",
    ],
    "line endings": [SSE_HEAD, *_chunked(b"data: {\"status\": \"IN_PROGRESS\"}\r\r", b"data: {\"status\":\r",
                                         b"data:  \"COMPLETED\"}\n\n"), b"0\r\n\r\n"],
    "last event unterminated": [SSE_HEAD, *_chunked(_event(status="IN_PROGRESS"), b"data: " + DONE), b"0\r\n\r\n"],
    "ends running": [SSE_HEAD, *_chunked(_event(status="IN_PROGRESS")), b"0\r\n\r\n"],
    "cut mid-chunk": [SSE_HEAD, b"40\r\n" + _event(status="IN_PROGRESS")],
    "not utf-8": [SSE_HEAD, *_chunked(b"data: {\"status\": \"IN_PROGRESS\", \"x\": \"\xff\xfe\"}\n\n",
                                      b"data: " + DONE + b"\n\n"), b"0\r\n\r\n"],
    "charset": [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=latin-1\r\ncontent-length: %d\r\n\r\n"
                % len(b"data: {\"status\": \"COMPLETED\", \"x\": \"\xe9\"}\n\n"),
                b"data: {\"status\": \"COMPLETED\", \"x\": \"\xe9\"}\n\n"],
    "gzip": [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\n"
             b"content-length: %d\r\n\r\n" % len(gzip.compress(_event(status="COMPLETED", n=1))),
             gzip.compress(_event(status="COMPLETED", n=1))],
    "405": [b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n"],
    "json 200": [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"],
    "500": [b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/event-stream\r\ncontent-length: 0\r\n\r\n"],
    "hang up": [],
}


async def _script_server(answer: list[bytes], seen: list[bytes]) -> asyncio.Server:
    """Writes `answer` to each connection, then closes it; records each request head."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            seen.append(await reader.readuntil(b"\r\n\r\n"))
            for piece in answer:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    handlers: list[asyncio.Task[None]] = []
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    server.handlers = handlers  # type: ignore[attr-defined]
    return server


async def _stop(server: asyncio.Server) -> None:
    server.close()
    await asyncio.wait_for(asyncio.gather(*server.handlers), 5)  # type: ignore[attr-defined]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=4)
    http = upstream_client(limits=limits, timeout=httpx.Timeout(5.0), headers={"user-agent": "imagegate/test"})
    yield http
    await http.aclose()


async def _follow(
    http: httpx.AsyncClient, answer: list[bytes], *, plain: bool
) -> tuple[dict[str, Any] | StreamMiss, list[dict[str, Any]], bytes, str | None]:
    """(verdict, events reported, request bytes, whether fal was remembered as not streaming)."""
    seen: list[bytes] = []
    server = await _script_server(answer, seen)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{PATH}"
    reported: list[dict[str, Any]] = []

    async def report(event: dict[str, Any]) -> None:
        reported.append(event)

    stream = StatusStream(http, 10)
    try:
        if plain:
            verdict = await stream.follow(url, dict(HEADERS), cast(ProgressReporter, report))
        else:  # httpx's own path on the same client
            verdict = await stream._follow(url, dict(HEADERS), _Events(), cast(ProgressReporter, report))
    finally:
        await _stop(server)
    request = seen[0].replace(url.split("/")[2].encode(), b"HOST") if seen else b""
    return verdict, reported, request, stream.unsupported


def _log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [re.sub(r":\d+/", ":PORT/", r.getMessage()) for r in caplog.records if r.name == "httpx"]


@pytest.mark.parametrize("name", list(ANSWERS))
async def test_plain_stream_is_httpx_stream(
    name: str, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="httpx")
    expected = await _follow(client, ANSWERS[name], plain=False)
    httpx_log = _log_lines(caplog)
    caplog.clear()

    def no_httpx_stream(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the plain path used httpx's stream()")

    monkeypatch.setattr(client, "stream", no_httpx_stream)
    got = await _follow(client, ANSWERS[name], plain=True)
    assert got[0] == expected[0] and got[1:] == expected[1:]
    assert _log_lines(caplog) == httpx_log and len(httpx_log) == (name != "hang up")
    assert expected[2].startswith(b"GET " + PATH.encode() + b" HTTP/1.1\r\n")


async def test_plain_stream_verdicts(client: httpx.AsyncClient) -> None:
    """What the fallback rules hang on (fal-protocol.md §4.4): the COMPLETED event, a stream not
    served (remembered for the process), a broken one (this job polls)."""
    verdict, reported, _, _ = await _follow(client, ANSWERS["sse"], plain=True)
    assert verdict == json.loads(DONE)
    assert [event["status"] for event in reported] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert (await _follow(client, ANSWERS["line endings"], plain=True))[0] == {"status": "COMPLETED"}
    assert (await _follow(client, ANSWERS["gzip"], plain=True))[0] == {"status": "COMPLETED", "n": 1}
    assert (await _follow(client, ANSWERS["charset"], plain=True))[0] == {"status": "COMPLETED", "x": "é"}
    for name in ("405", "json 200"):
        verdict, _, _, unsupported = await _follow(client, ANSWERS[name], plain=True)
        assert verdict is StreamMiss.UNSUPPORTED and unsupported is not None
    for name in ("ends running", "cut mid-chunk", "500", "hang up"):
        verdict, _, _, unsupported = await _follow(client, ANSWERS[name], plain=True)
        assert verdict is StreamMiss.BROKEN and unsupported is None, name


async def test_plain_stream_returns_its_connection(client: httpx.AsyncClient) -> None:
    """A stream read to its end leaves no connection behind, and none is counted open."""
    seen: list[bytes] = []
    answer = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
              % len(_event(status="COMPLETED")), _event(status="COMPLETED")]
    server = await _script_server(answer, seen)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{PATH}"
    stream = StatusStream(client, 1)
    try:
        for _ in range(3):
            assert await stream.follow(url, dict(HEADERS), None) == {"status": "COMPLETED"}
        assert stream.open == 0 and len(seen) == 3
    finally:
        await _stop(server)


def test_stream_url_is_httpx_url() -> None:
    for status_url in (
        "https://queue.fal.run/fal-ai/app/requests/r1/status",
        "https://queue.fal.run/fal-ai/app/requests/r1/status/?x=1",
        "http://127.0.0.1:8080/a/requests/r/status?",
        "https://queue.fal.run/a/requests/r%2F1/status",
        "https://QUEUE.fal.run:443/a/status",
    ):
        url = httpx.URL(status_url)
        assert stream_url(status_url) == str(url.copy_with(path=url.path.rstrip("/") + "/stream"))


@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("piece", [b"x" * 65536, b"data: " + b"x" * 65530 + b"\n"], ids=["one line", "one event"])
async def test_an_endless_line_or_event_is_a_broken_stream_not_unbounded_memory(
    client: httpx.AsyncClient, plain: bool, piece: bytes
) -> None:
    """A stream that never ends its line (or its event) is not buffered without end: past
    MAX_EVENT_CHARS it is BROKEN (the job polls) and the connection is dropped."""
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(SSE_HEAD)
            while sent < 64 * 1024 * 1024:
                writer.write(_chunked(piece)[0])
                await writer.drain()
                sent += len(piece)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{PATH}"
    stream = StatusStream(client, 10)
    try:
        async with asyncio.timeout(30):
            if plain:
                verdict = await stream.follow(url, dict(HEADERS), None)
            else:
                verdict = await stream._follow(url, dict(HEADERS), _Events(), None)
    finally:
        server.close()
    assert verdict is StreamMiss.BROKEN and stream.unsupported is None
    assert sent < 16 * MAX_EVENT_CHARS  # read no further than the bound (and the socket buffers)


async def test_a_compressed_endless_line_is_a_broken_stream_within_bounded_memory(client: httpx.AsyncClient) -> None:
    """A gzip stream whose one line decodes to 64 MiB: BROKEN once the line passes MAX_EVENT_CHARS,
    decoded a slice at a time (never the whole chunk at once)."""
    import tracemalloc

    bomb = gzip.compress(b"x" * (64 * 1024 * 1024), compresslevel=9)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n"

    server = await _script_server([head % len(bomb) + bomb], [])
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{PATH}"
    stream = StatusStream(client, 10)
    tracemalloc.start()
    try:
        async with asyncio.timeout(30):
            verdict = await stream.follow(url, dict(HEADERS), None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        await _stop(server)
    assert verdict is StreamMiss.BROKEN and stream.unsupported is None
    assert peak < 24 * 1024 * 1024, peak
