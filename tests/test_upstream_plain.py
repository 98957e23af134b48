"""The plain path of the upstream client (`upstream_plain.UpstreamClient`) is httpx's path minus its
cost: byte for byte the same request on the wire, the same response and log line, exceptions that
name their request; and the calls the adapters make on every job do take it."""

from __future__ import annotations

import asyncio
import collections
import datetime
import gc
import gzip
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from tests.fakes.fal import FakeFal, FalScenario
from tests.fakes.server import LocalServer

from imagegate.providers.base import CallContext, Route
from imagegate.providers.common import on_origins
from imagegate.providers.fal import FalProvider
from imagegate.settings import FalSettings, ProvidersSettings, Settings
from imagegate.upstream_http import WireTransport, upstream_client
from imagegate.upstream_plain import plain_netloc, plain_origin
from imagegate.upstream_response import response_header

Capture = tuple[str, list[bytes]]
MODEL = "fal-ai/qwen-image"


async def _capture_server(seen: list[bytes]) -> asyncio.Server:
    """Records every request (head and body) as raw bytes; answers 200 with a small JSON body."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.split(b"\r\n")
            length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length")), 0)
            seen.append(head + await reader.readexactly(length))
            body = b'{"status":"COMPLETED"}'
            head_out = b"HTTP/1.1 202 Accepted\r\ncontent-length: %d\r\nx-fal-request-id: r1\r\n\r\n" % len(body)
            writer.write(head_out + body)
            await writer.drain()

    return await asyncio.start_server(handler, "127.0.0.1", 0)


@pytest.fixture
async def capture() -> AsyncIterator[Capture]:
    seen: list[bytes] = []
    server = await _capture_server(seen)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen
    server.close()


@pytest.fixture
def httpx_sends(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    """The requests that go through httpx's own `send` (the plain path's never do)."""
    sent: list[httpx.Request] = []
    original_send = httpx.AsyncClient.send

    async def counted_send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        sent.append(request)
        return await original_send(self, request, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", counted_send)
    return sent


def _client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=4)
    return upstream_client(limits=limits, timeout=httpx.Timeout(5.0), headers={"user-agent": "imagegate/test"})


CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/fal-ai/app/requests/r1/status", {"headers": {"Authorization": "Key k", "Accept": "application/json"}}),
    ("GET", "/q?sig=a%2Fb&x=1", {}),
    ("POST", "/fal-ai/qwen-image", {"json": {"prompt": "é ☃", "n": 1}, "headers": {"X-Fal-Request-Timeout": "119.9"}}),
    ("POST", "/empty", {"headers": {"USER-AGENT": "other", "content-type": "text/plain"}}),
    ("PUT", "/upload", {"content": b"\x89PNG bytes", "headers": {"Content-Type": "image/png"}, "timeout": 3.0}),
    ("PUT", "/cancel", {"content": b"", "timeout": httpx.Timeout(2.0, connect=1.0)}),
    ("POST", "/own-length", {"content": b"abc", "headers": {"Content-Length": "3", "Host": "fal.example"}}),
    ("DELETE", "/job", {"headers": {"Authorization": "Key k"}}),
    ("PATCH", "/typed", {"content": b"x", "headers": {"content-type": "text/plain"}}),
]


async def test_plain_calls_send_what_httpx_sends(capture: Capture, httpx_sends: list[httpx.Request]) -> None:
    base, seen = capture
    async with _client() as client:
        for method, path, kwargs in CALLS:
            plain = await client.request(method, base + path, **kwargs)
            httpx_own = await httpx.AsyncClient.request(client, method, base + path, **kwargs)
            assert (plain.status_code, plain.json(), plain.headers.raw) == (
                httpx_own.status_code,
                httpx_own.json(),
                httpx_own.headers.raw,
            )
            assert plain.reason_phrase == httpx_own.reason_phrase == "Accepted"
            for attr in ("content", "num_bytes_downloaded", "is_closed", "is_stream_consumed", "http_version"):
                assert getattr(plain, attr) == getattr(httpx_own, attr), attr
            assert plain.request.url == httpx_own.request.url
            assert plain.elapsed.total_seconds() >= 0
    assert len(httpx_sends) == len(CALLS)  # only the httpx_own half went through httpx's send
    pairs = list(zip(seen[0::2], seen[1::2], strict=True))
    assert len(pairs) == len(CALLS)
    for plain_bytes, httpx_bytes in pairs:
        assert plain_bytes == httpx_bytes


async def test_what_a_plain_response_builds_on_first_use_is_httpx_s(capture: Capture) -> None:
    """Headers, extensions, stream, request and elapsed of a plain response are built when first
    read: each is what httpx's own path gives."""
    base, _ = capture
    async with _client() as client:
        for method, path, kwargs in CALLS:
            plain = await client.request(method, base + path, **kwargs)
            httpx_own = await httpx.AsyncClient.request(client, method, base + path, **kwargs)
            assert plain.headers.encoding == httpx_own.headers.encoding
            assert plain.headers.get("x-fal-request-id") == httpx_own.headers.get("x-fal-request-id") == "r1"
            assert plain.headers.multi_items() == httpx_own.headers.multi_items()
            assert plain.extensions == httpx_own.extensions
            assert plain.text == httpx_own.text and plain.encoding == httpx_own.encoding
            assert (await plain.aread(), [c async for c in plain.aiter_bytes()]) == (
                await httpx_own.aread(), [c async for c in httpx_own.aiter_bytes()]
            )
            assert plain.request.method == httpx_own.request.method
            assert plain.request.headers.raw == httpx_own.request.headers.raw
            assert plain.request.content == httpx_own.request.content
            assert plain.request.extensions == httpx_own.request.extensions  # the timeouts
            assert plain.raise_for_status() is plain
            assert isinstance(plain.elapsed, datetime.timedelta)
            await plain.aclose()
            with pytest.raises(AttributeError):
                _ = plain._cookies  # what httpx's response lacks, the plain one lacks too


async def _gzip_server() -> asyncio.Server:
    """`/latin`: a header in Latin-1; `/moved`: a 303 to `/next`; `/broken`: a 302 to a Location
    that is no URL; anything else: a gzip-encoded JSON body."""
    body = gzip.compress(b'{"status":"COMPLETED"}')

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                path = (await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)[1]
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            head, out = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(body), body
            if path == b"/latin":  # a header value that is not ASCII, a body that is not encoded
                head, out = b"HTTP/1.1 200 OK\r\nx-name: caf\xe9\r\ncontent-length: 2\r\n\r\n", b"{}"
            elif path == b"/moved":
                head, out = b"HTTP/1.1 303 See Other\r\nlocation: /next\r\ncontent-length: 0\r\n\r\n", b""
            elif path == b"/broken":
                head, out = b"HTTP/1.1 302 Found\r\nlocation: http://a:notaport/\r\ncontent-length: 0\r\n\r\n", b""
            writer.write(head + out)
            await writer.drain()

    return await asyncio.start_server(handler, "127.0.0.1", 0)


async def _get_both(path: str) -> tuple[httpx.Response, httpx.Response]:
    """GET `path` of `_gzip_server` on the plain path and on httpx's own."""
    server = await _gzip_server()
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{path}"
    try:
        async with _client() as client:
            return await client.get(url), await httpx.AsyncClient.request(client, "GET", url)
    finally:
        server.close()


async def test_an_encoded_body_is_decoded_as_httpx_decodes_it() -> None:
    plain, httpx_own = await _get_both("/status")
    assert plain.json() == httpx_own.json() == {"status": "COMPLETED"}
    assert (plain.content, plain.num_bytes_downloaded) == (httpx_own.content, httpx_own.num_bytes_downloaded)
    assert plain.headers.raw == httpx_own.headers.raw


async def test_headers_that_are_not_ascii_read_as_httpx_reads_them() -> None:
    plain, httpx_own = await _get_both("/latin")
    assert plain.headers["x-name"] == httpx_own.headers["x-name"] == "caf\u00e9"
    assert plain.headers.encoding == httpx_own.headers.encoding == "iso-8859-1"


async def _serve(answer: bytes) -> asyncio.Server:
    """A server that answers every request on a connection with `answer`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(answer)
            await writer.drain()

    return await asyncio.start_server(handler, "127.0.0.1", 0)


async def test_one_header_read_without_building_the_headers_is_httpx_s() -> None:
    """`response_header` answers what `headers.get` answers (repeated headers joined, names in any
    case, values that are not ASCII, absent headers), on the plain path and on httpx's own."""
    head = (
        b"HTTP/1.1 200 OK\r\nX-Fal-Request-Id: r1\r\nx-twice: a\r\nX-TWICE: b\r\n"
        b"x-name: caf\xe9\r\ncontent-length: 2\r\n\r\n{}"
    )

    server = await _serve(head)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/h"
    try:
        async with _client() as client:
            for name in ("x-fal-request-id", "x-twice", "x-name", "x-absent"):
                plain, httpx_own = await client.get(url), await httpx.AsyncClient.request(client, "GET", url)
                assert "headers" not in plain.__dict__  # the plain path has not built them
                expected = httpx_own.headers.get(name)
                assert response_header(plain, name) == response_header(httpx_own, name) == expected
                assert response_header(plain, name) == plain.headers.get(name)  # and once they are built
    finally:
        server.close()
    assert [httpx_own.headers.get(n) for n in ("x-fal-request-id", "x-twice", "x-name")] == ["r1", "a, b", "caf\u00e9"]


async def test_what_the_plain_path_works_out_once_follows_the_client(
    capture: Capture, httpx_sends: list[httpx.Request]
) -> None:
    """The merged header lists follow changes to the client's headers; a client given auth, event
    hooks or a base path after its first calls sends through httpx again."""
    base, seen = capture
    headers = {"Authorization": "Key k"}
    async with _client() as client:
        await client.get(f"{base}/a", headers=headers)
        client.headers["x-added"] = "1"
        del client.headers["accept"]
        await client.get(f"{base}/b", headers=headers)
        await httpx.AsyncClient.request(client, "GET", f"{base}/b", headers=headers)
        assert [str(r.url) for r in httpx_sends] == [f"{base}/b"]
        assert seen[-2] == seen[-1] and b"x-added: 1" in seen[-2] and b"accept: */*" not in seen[-2].lower()
        client.auth = ("user", "pw")
        await client.get(f"{base}/c")
        client.auth = None

        async def hook(request: httpx.Request) -> None:
            return None

        client.event_hooks["request"].append(hook)
        await client.get(f"{base}/d")
        client.event_hooks["request"].clear()
        client.base_url = httpx.URL("http://unused.example/prefix/")
        await client.get(f"{base}/e")
    assert [str(r.url) for r in httpx_sends] == [f"{base}/b", f"{base}/c", f"{base}/d", f"{base}/e"]


async def test_the_httpx_log_line_is_the_same(capture: Capture, caplog: pytest.LogCaptureFixture) -> None:
    base, _ = capture
    caplog.set_level(logging.INFO, logger="httpx")
    async with _client() as client:
        await client.get(f"{base}/status")
        await httpx.AsyncClient.request(client, "GET", f"{base}/status")
    lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert len(lines) == 2 and lines[0] == lines[1]
    assert lines[0] == f'HTTP Request: GET {base}/status "HTTP/1.1 202 Accepted"'


async def test_other_calls_take_httpx_s_path(capture: Capture, httpx_sends: list[httpx.Request]) -> None:
    base, _ = capture
    async with _client() as client:
        await client.get(f"{base}/p", params={"a": "b c"})
        await client.get(f"{base}/a b")  # httpx quotes it
        await client.get(httpx.URL(f"{base}/u"))
        await client.get(f"{base}/h", headers=[("x-a", "1")])
        with pytest.raises(UnicodeEncodeError):  # httpx's own error for a header it cannot encode
            await client.get(f"{base}/h", headers={"x-name": "caf\u00e9"})
    assert [str(r.url) for r in httpx_sends] == [f"{base}/p?a=b+c", f"{base}/a%20b", f"{base}/u", f"{base}/h"]


async def test_a_failed_plain_call_raises_httpx_s_error_naming_its_request() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with _client() as client:
        with pytest.raises(httpx.ConnectError) as caught:
            await client.post(f"http://127.0.0.1:{port}/submit", json={"a": 1})
    assert caught.value.request.method == "POST"
    assert str(caught.value.request.url) == f"http://127.0.0.1:{port}/submit"


async def test_a_closed_client_refuses_plain_calls(capture: Capture) -> None:
    base, _ = capture
    client = _client()
    await client.aclose()
    with pytest.raises(RuntimeError):
        await client.get(f"{base}/x")


ACCEPTED = [
    "http://127.0.0.1:8080/a/b",
    "https://queue.fal.run/fal-ai/qwen-image/requests/0b1c-9f/status?logs=1",
    "https://v3.fal.media/files/a%2Fb.png?sig=x%2By%3D&e=1&k=~!$'()*,;:@",
    "http://fal.example:65535/",
    "https://h/x/.hidden/..dots/end.",
]
REFUSED = [
    "https://Queue.fal.run/a",  # httpx lower-cases the host
    "https://fal.run:443/a",  # and drops a default port
    "http://fal.run:80/a",
    "http://fal.run:99999/a",
    "http://fal.run:080/a",
    "https://fal.run",  # no path
    "https://fal.run/a/../b",  # dot segments are removed
    "https://fal.run/a/./b",
    "https://fal.run/a/..",
    "https://fal.run/a%zz",  # a bad escape is quoted
    "https://fal.run/a b",
    "https://fal.run/caf\u00e9",
    "https://fal.run/a#frag",
    "https://user:pw@fal.run/a",
    "https://[::1]/a",
    "ftp://fal.run/a",
    "https://fal.run/a\"b",
    "https://fal.run/a{b}",
]


@pytest.mark.parametrize("url", ACCEPTED)
def test_accepted_urls_are_the_ones_httpx_sends_unchanged(url: str) -> None:
    netloc = plain_netloc(url)
    parsed = httpx.URL(url)
    assert str(parsed) == url
    assert netloc == parsed.netloc.decode("ascii")
    assert httpx.Request("GET", url).headers["host"] == netloc
    assert plain_origin(url) == (parsed.scheme, parsed.host, parsed.port)  # the credential-host check's parse


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://queue.fal.run/fal-ai/x/requests/1/status", True),
        ("https://queue.fal.run:8443/fal-ai/x", False),  # another port
        ("http://queue.fal.run/fal-ai/x", False),  # another scheme
        ("https://queue.fal.run.evil.example/x", False),
        ("https://QUEUE.fal.run/x", True),  # httpx's parse: the host compared in lower case
        ("https://queue.fal.run:443/x", True),  # the default port is no port
        ("https://evil.example/x?u=https://queue.fal.run/", False),
        ("https://user@evil.example/x", False),
        ("https://queue.fal.run@evil.example/x", False),
        ("https://[::1]/x", False),
        ("not a url", False),
    ],
)
def test_the_credential_host_check_agrees_with_httpx_s_parse(url: str, expected: bool) -> None:
    assert on_origins(url, ("https://queue.fal.run", "https://fal.run/sync")) is expected


@pytest.mark.parametrize("url", REFUSED)
def test_other_urls_are_left_to_httpx(url: str) -> None:
    assert plain_netloc(url) is None



async def test_a_fal_queue_job_is_three_plain_calls(httpx_sends: list[httpx.Request]) -> None:
    """The calls of a passthrough job (submit, one status poll, result) all take the plain path,
    and a job that is done at the first poll costs exactly those three upstream requests."""
    fake = FakeFal()
    fake.scenario = FalScenario.instant()
    with LocalServer(fake.app) as srv:
        fal = FalSettings(key="test-fal-key", queue_url=srv.url, run_url=srv.url + "/sync", rest_url=srv.url)
        async with _client() as http:
            provider = FalProvider(http, Settings(providers=ProvidersSettings(fal=fal)))
            context = CallContext(request_id="gw-1", deadline=time.monotonic() + 10, operation="generate")
            result = await provider.run({"prompt": "a lighthouse", "num_images": 1}, Route("fal", MODEL), context)
    assert len(result.images) == 1
    assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in fake.requests] == [
        ("POST", "qwen-image"),
        ("GET", "status"),
        ("GET", fake.last_submit.request_id),
    ]
    assert httpx_sends == []


async def test_a_client_s_own_params_and_cookies_are_sent_as_httpx_sends_them(
    capture: Capture, httpx_sends: list[httpx.Request]
) -> None:
    """httpx merges the client's query params and cookies into every call: a client given either
    sends through httpx, not without them."""
    base, seen = capture
    async with _client() as client:
        client.params = httpx.QueryParams({"k": "v"})
        await client.get(f"{base}/p")
        client.params = httpx.QueryParams()
        client.cookies = httpx.Cookies({"c": "v"})
        await client.get(f"{base}/c")
    assert [str(r.url) for r in httpx_sends] == [f"{base}/p?k=v", f"{base}/c"]
    assert seen[0].startswith(b"GET /p?k=v ") and b"\r\nCookie: c=v\r\n" in seen[1]



async def test_a_redirect_not_followed_is_answered_as_httpx_answers_it() -> None:
    """httpx gives a redirect it does not follow its `next_request` (and refuses a Location that
    is no URL): the plain path does too."""
    plain, httpx_own = await _get_both("/moved")
    assert plain.next_request is not None and httpx_own.next_request is not None
    assert (plain.next_request.method, plain.next_request.url, plain.next_request.headers.raw) == (
        httpx_own.next_request.method, httpx_own.next_request.url, httpx_own.next_request.headers.raw
    )
    with pytest.raises(httpx.RemoteProtocolError, match="Invalid URL in location header"):
        await _get_both("/broken")



async def test_a_fresh_use_client_default_timeout_means_the_client_s_timeout(
    capture: Capture, httpx_sends: list[httpx.Request]
) -> None:
    """httpx reads any `UseClientDefault` instance as "the client's timeout"; so does the plain path."""
    from httpx._client import UseClientDefault

    base, seen = capture
    async with _client() as client:
        response = await client.get(base + "/status", timeout=UseClientDefault())
    assert response.status_code == 202
    assert response.request.extensions["timeout"] == httpx.Timeout(5.0).as_dict()
    assert not httpx_sends and len(seen) == 1  # it went the plain way


BAD_HEADERS: list[tuple[dict[str, str], str]] = [
    ({"Authorization": "Key k\r\nX-Injected: 1"}, "authorization"),  # a second header smuggled in
    ({"Authorization": "Key k\n"}, "authorization"),  # a key read from a file with its newline
    ({"X-Sp": " padded"}, "x-sp"),
    ({"X-Nul": "a\x00b"}, "x-nul"),
    ({"X Bad": "v"}, "x bad"),
    ({"X-Bad:": "v"}, "x-bad:"),
]


@pytest.mark.parametrize(("headers", "name"), BAD_HEADERS)
async def test_a_header_httpx_would_refuse_is_refused_not_written(
    capture: Capture, headers: dict[str, str], name: str
) -> None:
    """httpx's own transport (h11) refuses a header name or value that is not HTTP (a CR or LF in
    a value would write a header of its own): `httpx.LocalProtocolError`, nothing sent. The plain
    path and httpx's path on the gateway's transport refuse it too, with a message that names the
    header but does not quote its value (a credential)."""
    base, seen = capture
    async with _client() as client, httpx.AsyncClient() as reference:
        with pytest.raises(httpx.LocalProtocolError):
            await reference.get(f"{base}/ref", headers=headers)
        for call in (
            lambda: client.get(f"{base}/plain", headers=headers),
            lambda: client.post(f"{base}/plain", json={"a": 1}, headers=headers),
            lambda: httpx.AsyncClient.request(client, "GET", f"{base}/httpx", headers=headers),
        ):
            with pytest.raises(httpx.LocalProtocolError) as caught:
                await call()
            assert name in str(caught.value).lower()
            assert "Key k" not in str(caught.value)
        client.headers.update(headers)  # the client's own headers (e.g. a configured key)
        with pytest.raises(httpx.LocalProtocolError):
            await client.get(f"{base}/client")
    assert seen == []


REFERENCE_CALLS: list[tuple[str, str, dict[str, Any]]] = [
    *CALLS,
    ("GET", "/host", {"headers": {"X-A": "1", "host": "images.example", "Accept": "image/*"}}),  # core.fetch's Host
    ("POST", "/te", {"json": [1], "headers": {"Transfer-Encoding": "chunked"}}),
    ("PUT", "/te", {"content": b"abc", "headers": {"transfer-encoding": "chunked"}}),
    ("POST", "/typed-len", {"json": {"a": "\u00e9"}, "headers": {"Content-Type": "application/json; charset=utf-8"}}),
    ("OPTIONS", "/opt", {}),
    ("post", "/lower", {"json": {"n": 1.5}}),
]


async def _framing_server(seen: list[bytes]) -> asyncio.Server:
    """`_capture_server`, reading a body as a server does: chunked when `Transfer-Encoding` says
    so (it wins over Content-Length), else Content-Length bytes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = [line.lower() for line in head.split(b"\r\n")]
                if any(line.startswith(b"transfer-encoding:") and b"chunked" in line for line in lines):
                    body = await reader.readuntil(b"0\r\n\r\n")
                else:
                    length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length")), 0)
                    body = await reader.readexactly(length)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
                return
            seen.append(head + body)
            writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()

    return await asyncio.start_server(handler, "127.0.0.1", 0)


async def test_plain_calls_send_what_httpx_s_own_transport_sends() -> None:
    """Byte for byte what a plain `httpx.AsyncClient` (its own transport: httpcore and h11) writes
    for the same calls with the same client headers: h11 writes `Host` first, and frames a body
    chunked when the headers say `Transfer-Encoding: chunked`."""
    seen: list[bytes] = []
    server = await _framing_server(seen)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    reference = httpx.AsyncClient(timeout=httpx.Timeout(1.0), headers={"user-agent": "imagegate/test"})
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=4)
    ours = upstream_client(limits=limits, timeout=httpx.Timeout(1.0), headers={"user-agent": "imagegate/test"})
    async with ours as client, reference:
        for method, path, kwargs in REFERENCE_CALLS:
            for sender in (client, reference):
                response = await sender.request(method, base + path, **kwargs)
                assert response.status_code == 202
    server.close()
    pairs = list(zip(seen[0::2], seen[1::2], strict=True))
    assert len(pairs) == len(REFERENCE_CALLS)
    for (method, path, _), (ours, theirs) in zip(REFERENCE_CALLS, pairs, strict=True):
        assert ours == theirs, (method, path)


async def test_a_connection_closed_after_it_was_handed_to_a_waiter_is_not_written_to(capture: Capture) -> None:
    """A waiting call is handed a released connection, which closes before the call's task runs
    (here: the server's unasked 408 on it, which closes it at once). The call connects anew in
    the slot that freed: its POST reaches the server once, not written into a closed socket and
    then waited on until its read timeout."""
    from imagegate.upstream_wire import Timeouts

    base, seen = capture
    port = int(base.rsplit(":", 1)[1])
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=4)
    async with upstream_client(limits=limits, timeout=httpx.Timeout(0.5)) as client:
        await client.get(f"{base}/warm")
        assert isinstance(client._transport, WireTransport)
        origin = client._transport.pool().origin("http", "127.0.0.1", port)
        held = await origin.acquire(Timeouts(1.0, 1.0, 1.0))  # the one connection, idle until now
        post = asyncio.create_task(client.post(f"{base}/submit", json={"prompt": "x"}))
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(origin.waiters) == 1
        origin.release(held)  # handed to the waiting POST ...
        held.data_received(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n\r\n")  # ... and closed
        response = await post
        assert (origin.open, len(origin.idle)) == (1, 1)  # the new connection holds the one slot
    assert response.status_code == 202
    assert [r.split(b" ", 2)[:2] for r in seen] == [[b"GET", b"/warm"], [b"POST", b"/submit"]]


@pytest.mark.parametrize("plain", [True, False])
async def test_a_compression_bomb_is_a_decoding_error_within_bounded_memory(
    plain: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gzip body that decodes past MAX_BODY fails as httpx's decoder fails, and no more than one
    slice's expansion is held beyond the bound (on the plain path: read whole; on httpx's own path:
    the stream is decoded slice by slice, so a caller's own cap holds)."""
    import tracemalloc

    from imagegate import upstream_response

    monkeypatch.setattr(upstream_response, "MAX_BODY", 2 * 1024 * 1024)
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)  # ~64 KB that decode to 64 MiB
    head = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n"
    server = await _serve(head % len(bomb) + bomb)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/result"
    tracemalloc.start()
    try:
        async with _client() as client:
            if plain:
                with pytest.raises(httpx.DecodingError) as caught:
                    await client.get(url)
                assert caught.value.request.url == url
            else:
                size = 0
                async with httpx.AsyncClient.stream(client, "GET", url) as response:
                    async for part in response.aiter_bytes():
                        size += len(part)
                        if size > 2 * 1024 * 1024:  # the caller's own cap (providers/common.read_capped)
                            break
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        server.close()
    assert peak < 24 * 1024 * 1024, peak  # not the 64 MiB the body decodes to (a slice expands to ~4 MiB)


async def test_an_encoded_body_within_the_bound_reads_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from imagegate import upstream_response

    monkeypatch.setattr(upstream_response, "MAX_BODY", 100_000)
    body = b'{"images": "' + b"a" * 99_000 + b'"}'
    head = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n"
    server = await _serve(head % len(gzip.compress(body)) + gzip.compress(body))
    try:
        async with _client() as client:
            response = await client.get(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/result")
    finally:
        server.close()
    assert response.content == body and response.json()["images"] == "a" * 99_000
    assert response.is_closed and response.num_bytes_downloaded == len(gzip.compress(body))


async def test_plain_calls_leave_no_cyclic_garbage() -> None:
    """A plain call (every call of a job) leaves no reference cycles behind: with thousands of jobs in
    flight, every cyclic object per request is work for the garbage collector, whose pauses stall
    the event loop (`/healthz`). With the collector off and `DEBUG_SAVEALL`, what a collection then
    finds is exactly the cyclic garbage the calls made."""
    answer = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{"status":"ok"}'
    server = await _serve(answer)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/status"
    async with _client() as client:

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
            for _ in range(100):
                await calls()
            gc.collect()
            left = collections.Counter(type(item).__name__ for item in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
            server.close()
    # (the plain calls made 16 cyclic objects each while a parser callback raised per answer)
    assert sum(left.values()) <= 10, left.most_common(8)
