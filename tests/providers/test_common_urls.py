"""Malformed URLs from a provider are an upstream error, never a 500."""

from __future__ import annotations

import httpx
import pytest

from imagegate.core.errors import UpstreamError
from imagegate.providers.common import download, get_with_retry


@pytest.mark.parametrize("url", ["https://exa\u3000mple.com/a.png", "https://cdn.example/\x01a.png"])
async def test_download_of_a_malformed_url(url: str) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(UpstreamError):
            await download(http, url, provider="fal", max_bytes=100)


async def test_poll_of_a_malformed_url() -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(UpstreamError):
            await get_with_retry(http, "https://q.example/\x01status", provider="fal")
