"""Cost header, the `usage` object and `GET /v1/usage` after known requests; per-key limits over
real HTTP (429 through the SDK, a concurrency slot given back when the client disconnects); in
memory and on the real Redis."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.fakes.fal import FakeFal, FalScenario
from tests.fakes.server import LocalServer, wait_until
from tests.redis_support import redis_prefix, redis_url

from .access_support import KEYS, OPS, TEAM_A, TEAM_B, access_settings, fal, gateway, sdk, state

__all__ = ["fal", "redis_prefix", "redis_url", "state"]

LIMITED = "sk-limited-1111"


@pytest.fixture
def fake(fal: tuple[FakeFal, LocalServer]) -> FakeFal:
    fal[0].reset()
    fal[0].scenario = FalScenario.instant()
    return fal[0]


@pytest.fixture
def url(tmp_path: Path, fal: tuple[FakeFal, LocalServer], state: dict[str, Any]) -> Iterator[str]:
    keys = [*KEYS, {"name": "limited", "key": LIMITED, "rpm": 2, "max_concurrent": 1}]
    with gateway(access_settings(tmp_path, fal[1].url, redis=state, auth={"keys": keys})) as srv:
        yield srv.url


async def test_cost_header_usage_object_and_usage_endpoint(url: str, fake: FakeFal) -> None:
    team_a = sdk(url, TEAM_A)
    fanned = await team_a.images.with_raw_response.generate(model="fal-image", prompt="x", n=6, size="1024x768")
    assert len(fake.submits) == 2  # fal takes 4 per call: 4 + 2
    assert fanned.headers["x-imagegate-cost-usd"] == "0.1800"  # 6 images x 0.03, fan-out included
    usage = fanned.http_response.json()["usage"]
    assert usage["images"] == 6 and usage["megapixels"] == pytest.approx(6 * 1024 * 768 / 1e6)
    square = await team_a.images.with_raw_response.generate(model="sandbox-image", prompt="x", size="1024x1024")
    assert square.headers["x-imagegate-cost-usd"] == "0.0210"  # 1.048576 MP x 0.02
    with pytest.raises(openai.BadRequestError):  # generations on an edit model: a failure counts nothing
        await sdk(url, TEAM_B).images.generate(model="sandbox-edit", prompt="x")

    async with httpx.AsyncClient(base_url=url) as http:
        mine = (await http.get("/v1/usage", headers={"authorization": f"Bearer {TEAM_A}"})).json()
        assert mine == {
            "object": "list",
            "data": [
                {
                    "object": "imagegate.usage",
                    "key": "team-a",
                    "requests": 2,
                    "images": 7,
                    "megapixels": 5.767168,
                    "cost_usd": 0.200972,
                }
            ],
        }
        other = (await http.get("/v1/usage", headers={"api-key": TEAM_B})).json()
        assert [(row["key"], row["requests"], row["cost_usd"]) for row in other["data"]] == [("team-b", 0, 0.0)]
        admin = (await http.get("/v1/usage", headers={"authorization": f"Bearer {OPS}"})).json()
        assert [row["key"] for row in admin["data"]] == ["team-a"]
        assert admin["data"][0] == mine["data"][0]


async def test_rpm_429_through_the_sdk_with_openais_headers(url: str, fake: FakeFal) -> None:
    client = sdk(url, LIMITED)
    ok = await client.images.with_raw_response.generate(model="sandbox-image", prompt="x", size="64x64")
    assert ok.headers["x-ratelimit-limit-requests"] == "2"
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"
    await client.images.generate(model="sandbox-image", prompt="x", size="64x64")
    with pytest.raises(openai.RateLimitError) as info:
        await client.images.generate(model="sandbox-image", prompt="x", size="64x64")
    error = info.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.response.headers["x-ratelimit-reset-requests"].endswith("s")


async def test_concurrency_slot_is_released_when_the_client_disconnects(url: str, fake: FakeFal) -> None:
    fake.scenario = FalScenario.hang()
    body = b'{"model": "fal-image", "prompt": "slow"}'
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {LIMITED}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_until(lambda: len(fake.submits) == 1, timeout=5)
        with pytest.raises(openai.RateLimitError) as info:
            await sdk(url, LIMITED).images.generate(model="sandbox-image", prompt="x", size="64x64")
        assert "1 requests in flight" in info.value.message
    assert wait_until(lambda: fake.cancels == [fake.last_submit.request_id], timeout=5)
    fake.scenario = FalScenario.instant()
    result = await sdk(url, LIMITED).images.generate(model="fal-image", prompt="x")  # the slot came back
    assert len(result.data or []) == 1


async def test_streamed_request_with_an_idempotency_key_replays_its_events(url: str, fake: FakeFal) -> None:
    body = {"model": "fal-image", "prompt": "x", "stream": True}
    headers = {"authorization": f"Bearer {TEAM_A}", "idempotency-key": "stream-1"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        first = await http.post("/v1/images/generations", json=body, headers=headers)
        second = await http.post("/v1/images/generations", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.headers["content-type"].startswith("text/event-stream")
    assert "event: image_generation.completed" in first.text
    assert second.text == first.text and second.headers["idempotent-replayed"] == "true"
    assert len(fake.submits) == 1
