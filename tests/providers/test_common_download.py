"""`common.download`: the one capped, streaming download of provider outputs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from imagegate.core.errors import GatewayError, ProviderUnavailable, UpstreamError, UpstreamTimeout
from imagegate.providers import common
from imagegate.providers.common import download

URL = "https://cdn.example.com/out.png"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


class Chunks(httpx.AsyncByteStream):
    """A response body that counts how many chunks were read from it."""

    def __init__(self, size: int, count: int) -> None:
        self.chunk = b"\0" * size
        self.count = count
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.sent += 1
            yield self.chunk


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "backoff_delay", lambda *a, **k: 0.0)


async def test_body_within_the_cap(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.get(URL).respond(200, content=PNG)
    assert await download(http, URL, provider="p", max_bytes=len(PNG), headers={"X-A": "1"}) == PNG
    assert route.calls.last.request.headers["x-a"] == "1"


async def test_declared_length_over_the_cap_is_refused_unread(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    body = Chunks(64 * 1024, 100)
    mock.get(URL).mock(return_value=httpx.Response(200, headers={"Content-Length": str(10**12)}, stream=body))
    with pytest.raises(UpstreamError, match="larger than the limit of 1000000 bytes") as err:
        await download(http, URL, provider="p", max_bytes=1_000_000)
    assert body.sent == 0
    assert not err.value.retryable


async def test_streamed_body_over_the_cap_stops_at_the_cap(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    body = Chunks(64 * 1024, 10_000)  # 640 MiB if it were buffered
    mock.get(URL).mock(return_value=httpx.Response(200, stream=body))
    with pytest.raises(UpstreamError, match="larger than the limit"):
        await download(http, URL, provider="p", max_bytes=1024 * 1024)
    assert body.sent == 17  # the first chunk past 1 MiB


async def test_redirects_are_followed_with_per_hop_headers(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    mock.get("https://a.example/x").respond(302, headers={"Location": "https://b.example/y"})
    target = mock.get("https://b.example/y").respond(200, content=PNG)
    seen: list[str] = []

    def headers_for(url: str) -> dict[str, str] | None:
        seen.append(url)
        return {"Authorization": "Bearer t"} if url.startswith("https://a.example") else None

    assert await download(http, "https://a.example/x", provider="p", max_bytes=100, headers_for=headers_for) == PNG
    assert seen == ["https://a.example/x", "https://b.example/y"]
    assert "authorization" not in target.calls.last.request.headers


async def test_too_many_redirects(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    mock.get(URL).respond(302, headers={"Location": URL})
    with pytest.raises(UpstreamError, match="redirected too many times"):
        await download(http, URL, provider="p", max_bytes=100)


async def test_error_status_is_mapped_with_its_body(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    mock.get(URL).respond(404, json={"detail": "gone"})
    with pytest.raises(UpstreamError, match=r"HTTP 404"):
        await download(http, URL, provider="p", max_bytes=100)

    def on_status(response: httpx.Response) -> UpstreamError:
        return UpstreamError(f"mapped {response.status_code} {response.json()['detail']}")

    with pytest.raises(UpstreamError, match="mapped 404 gone"):
        await download(http, URL, provider="p", max_bytes=100, on_status=on_status)


async def test_transient_failures_are_retried_when_asked(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    answers = [httpx.Response(503), httpx.ConnectError("reset"), httpx.Response(200, content=PNG)]
    route = mock.get(URL).mock(side_effect=answers)
    assert await download(http, URL, provider="p", max_bytes=100, attempts=3) == PNG
    assert route.call_count == 3


@pytest.mark.parametrize(
    ("exc", "cls"),
    [(httpx.ConnectError("refused"), ProviderUnavailable), (httpx.ReadTimeout("slow"), UpstreamTimeout)],
)
async def test_transport_errors_are_mapped_not_retryable(
    mock: respx.MockRouter, http: httpx.AsyncClient, exc: Exception, cls: type[GatewayError]
) -> None:
    mock.get(URL).mock(side_effect=exc)
    with pytest.raises(cls) as err:
        await download(http, URL, provider="p", max_bytes=100)
    assert not err.value.retryable and err.value.fallback
