"""core.fetch: the SSRF guard. Offline: IP literals, an injected resolver, httpx.MockTransport, and a
tiny HTTP server on 127.0.0.1 for the real-socket path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from imagegate.core.errors import InvalidRequest, PayloadTooLarge
from imagegate.core.fetch import MAX_REDIRECTS, GuardedFetcher, is_public_address
from imagegate.settings import FetchSettings

PUBLIC = "93.184.216.34"
BODY = b"\x89PNG\r\n\x1a\n pretend image"


def make_fetcher(
    handler: Callable[[httpx.Request], Any] | None = None,
    *,
    dns: dict[str, list[str]] | None = None,
    **settings: Any,
) -> tuple[GuardedFetcher, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if handler is None:
            return httpx.Response(200, content=BODY)
        result = handler(request)
        return await result if asyncio.iscoroutine(result) else result  # type: ignore[no-any-return]

    async def resolver(host: str, port: int) -> list[str]:
        if dns is None or host not in dns:
            raise OSError(f"unknown host {host}")
        return dns[host]

    http = httpx.AsyncClient(transport=httpx.MockTransport(record))
    return GuardedFetcher(http, FetchSettings(**settings), resolver=resolver), seen


async def refused(fetcher: GuardedFetcher, url: str, param: str = "image") -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        await fetcher.fetch(url, param=param)
    assert info.value.status == 400 and info.value.param == param
    return info.value


# -- addresses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.1.1",
        "100.64.0.1",
        "100.100.100.200",
        "168.63.129.16",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:0001::1",
        "2001:0000:4136:e378:8000:63bf:3fff:fdd2",  # Teredo (not global)
    ],
)
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", [PUBLIC, "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(address: str) -> None:
    assert is_public_address(address)


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",
        "http://10.0.0.5/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.png",
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00:ec2::254]/",
        "http://0.0.0.0:8080/",
    ],
)
async def test_private_ip_literals_are_refused_without_a_request(url: str) -> None:
    fetcher, seen = make_fetcher()
    error = await refused(fetcher, url)
    assert error.code == "url_not_allowed"
    assert seen == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "data:,x", "nope"])
async def test_other_schemes_are_refused(url: str) -> None:
    fetcher, seen = make_fetcher()
    error = await refused(fetcher, url, param="images")
    assert error.code == "invalid_url" and seen == []


@pytest.mark.parametrize("answer", [["10.0.0.1"], [PUBLIC, "127.0.0.1"], ["169.254.169.254"], ["not-an-ip"], []])
async def test_names_resolving_to_private_addresses_are_refused(answer: list[str]) -> None:
    fetcher, seen = make_fetcher(dns={"evil.example": answer})
    error = await refused(fetcher, "https://evil.example/a.png")
    assert error.code == "url_not_allowed" and "evil.example" in error.message
    assert seen == []


async def test_unresolvable_host_is_a_clear_400() -> None:
    fetcher, _ = make_fetcher(dns={})
    error = await refused(fetcher, "https://nowhere.example/a.png")
    assert "resolve" in error.message


# -- the happy path and DNS pinning ----------------------------------------------------------------


async def test_connects_to_the_vetted_address_with_the_real_host_name() -> None:
    fetcher, seen = make_fetcher(dns={"cdn.example": [PUBLIC]})
    assert await fetcher.fetch("https://cdn.example:8443/p/a.png?x=1", param="image") == BODY
    [request] = seen
    assert request.url.host == PUBLIC and request.url.port == 8443 and request.url.path == "/p/a.png"
    assert request.url.query == b"x=1"
    assert request.headers["host"] == "cdn.example:8443"
    assert request.extensions["sni_hostname"] == "cdn.example"


async def test_ipv6_public_literal_is_fetched() -> None:
    fetcher, seen = make_fetcher()
    assert await fetcher.fetch("http://[2606:4700:4700::1111]/a.png", param="image") == BODY
    assert seen[0].url.host == "2606:4700:4700::1111"


async def test_redirects_are_revalidated_every_hop() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/start":
            return httpx.Response(302, headers={"location": "http://169.254.169.254/latest/meta-data/"})
        return httpx.Response(200, content=BODY)

    fetcher, seen = make_fetcher(handler, dns={"cdn.example": [PUBLIC]})
    error = await refused(fetcher, "http://cdn.example/start")
    assert error.code == "url_not_allowed"
    assert len(seen) == 1  # the metadata address was never contacted


async def test_relative_redirect_to_another_public_host_is_followed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers["host"] == "a.example":
            return httpx.Response(301, headers={"location": "https://b.example/final.png"})
        if request.url.path == "/final.png":
            return httpx.Response(307, headers={"location": "/real.png"})
        return httpx.Response(200, content=BODY)

    fetcher, seen = make_fetcher(handler, dns={"a.example": [PUBLIC], "b.example": ["8.8.8.8"]})
    assert await fetcher.fetch("http://a.example/x", param="image") == BODY
    assert [(r.headers["host"], r.url.host, r.url.path) for r in seen] == [
        ("a.example", PUBLIC, "/x"),
        ("b.example", "8.8.8.8", "/final.png"),
        ("b.example", "8.8.8.8", "/real.png"),
    ]


async def test_at_most_three_redirects() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        hop = int(request.url.path.strip("/") or 0)
        return httpx.Response(302, headers={"location": f"/{hop + 1}"})

    fetcher, seen = make_fetcher(handler, dns={"loop.example": [PUBLIC]})
    error = await refused(fetcher, "http://loop.example/0")
    assert "redirect" in error.message and len(seen) == MAX_REDIRECTS + 1


async def test_http_errors_are_400() -> None:
    fetcher, _ = make_fetcher(lambda r: httpx.Response(404), dns={"cdn.example": [PUBLIC]})
    error = await refused(fetcher, "http://cdn.example/a.png", param="mask")
    assert "404" in error.message

    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    fetcher, _ = make_fetcher(boom, dns={"cdn.example": [PUBLIC]})
    assert "ConnectError" in (await refused(fetcher, "http://cdn.example/a.png")).message


# -- size and time limits --------------------------------------------------------------------------


async def test_declared_size_over_the_cap_is_413() -> None:
    fetcher, _ = make_fetcher(
        lambda r: httpx.Response(200, content=b"x" * 101), dns={"c.example": [PUBLIC]}, max_bytes=100
    )
    with pytest.raises(PayloadTooLarge) as info:
        await fetcher.fetch("http://c.example/a", param="images")
    assert info.value.status == 413 and info.value.param == "images"


async def test_streamed_size_over_the_cap_is_413() -> None:
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(1000):
            pulled += 1
            yield b"x" * 64

    fetcher, _ = make_fetcher(lambda r: httpx.Response(200, content=endless()), dns={"c.example": [PUBLIC]},
                              max_bytes=1000)  # fmt: skip
    with pytest.raises(PayloadTooLarge):
        await fetcher.fetch("http://c.example/a", param="image")
    assert pulled < 1000  # stopped reading at the cap
    exact, _ = make_fetcher(lambda r: httpx.Response(200, content=b"x" * 1000), dns={"c.example": [PUBLIC]},
                            max_bytes=1000)  # fmt: skip
    assert len(await exact.fetch("http://c.example/a", param="image")) == 1000


async def test_slow_servers_time_out() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200)

    fetcher, _ = make_fetcher(slow, dns={"c.example": [PUBLIC]}, timeout_seconds=0.05)
    error = await asyncio.wait_for(refused(fetcher, "http://c.example/a"), 2)
    assert "Timed out" in error.message


# -- a real local server ---------------------------------------------------------------------------


@pytest.fixture
async def local_server() -> AsyncIterator[str]:
    """A minimal HTTP/1.1 server on 127.0.0.1 answering every request with BODY."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(BODY)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + BODY)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/image.png"


async def test_loopback_server_is_refused_unless_allowed(local_server: str) -> None:
    async with httpx.AsyncClient() as http:
        guarded = GuardedFetcher(http, FetchSettings())
        with pytest.raises(InvalidRequest) as info:
            await guarded.fetch(local_server, param="image")
        assert info.value.code == "url_not_allowed"

        allowed = GuardedFetcher(http, FetchSettings(allow_hosts=["127.0.0.1"]))
        assert await allowed.fetch(local_server, param="image") == BODY


async def test_localhost_name_resolves_through_the_system_resolver_and_is_refused(local_server: str) -> None:
    async with httpx.AsyncClient() as http:
        guarded = GuardedFetcher(http, FetchSettings())
        with pytest.raises(InvalidRequest) as info:
            await guarded.fetch(local_server.replace("127.0.0.1", "localhost"), param="image")
        assert info.value.code == "url_not_allowed"
