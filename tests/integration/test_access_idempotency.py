"""Idempotency-Key through the official openai SDK against the fake fal, with the records in memory
and on the real Redis: one upstream job per key, identical responses, 409 for another body."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image
from tests.fakes.fal import FakeFal, FalScenario
from tests.fakes.server import LocalServer
from tests.redis_support import keys_with, redis_prefix, redis_url

from .access_support import TEAM_A, TEAM_B, access_settings, fal, gateway, sdk, state

__all__ = ["fal", "redis_prefix", "redis_url", "state"]


@pytest.fixture
def fake(fal: tuple[FakeFal, LocalServer]) -> FakeFal:
    fal[0].reset()
    fal[0].scenario = FalScenario(queue_polls=5, progress_polls=10)  # ~0.3 s: long enough to overlap
    return fal[0]


@pytest.fixture
def url(tmp_path: Path, fal: tuple[FakeFal, LocalServer], state: dict[str, Any]) -> Iterator[str]:
    settings = access_settings(tmp_path, fal[1].url, redis=state)
    with gateway(settings) as srv:
        yield srv.url


def generate(client: openai.AsyncOpenAI, key: str | None, prompt: str = "a red fox", **kw: Any) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return client.images.with_raw_response.generate(
        model="fal-image", prompt=prompt, response_format="b64_json", extra_headers=headers, **kw
    )


async def test_same_key_twice_runs_one_upstream_job(url: str, fake: FakeFal) -> None:
    client = sdk(url, TEAM_A)
    first = await generate(client, "order-1", n=2)
    second = await generate(client, "order-1", n=2)
    assert len(fake.submits) == 1
    assert first.http_response.json() == second.http_response.json()
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert first.headers["x-imagegate-cost-usd"] == "0.0600"
    assert second.headers["x-imagegate-cost-usd"] == "0.0000"  # the replay paid for nothing
    assert second.headers["x-imagegate-upstream-request-id"] == fake.submits[0].request_id
    image = Image.open(io.BytesIO(base64.b64decode(second.parse().data[1].b64_json)))
    assert image.size == (1024, 768)


async def test_concurrent_duplicate_waits_for_the_first(url: str, fake: FakeFal) -> None:
    client = sdk(url, TEAM_A)
    results = await asyncio.gather(generate(client, "order-2"), generate(client, "order-2"))
    assert len(fake.submits) == 1
    bodies = [r.http_response.json() for r in results]
    assert bodies[0] == bodies[1] and bodies[0]["data"][0]["b64_json"]
    assert sorted(r.headers.get("idempotent-replayed", "-") for r in results) == ["-", "true"]


async def test_different_body_under_the_same_key_is_409(url: str, fake: FakeFal) -> None:
    client = sdk(url, TEAM_A)
    await generate(client, "order-3")
    with pytest.raises(openai.ConflictError) as info:
        await generate(client, "order-3", prompt="a blue fox")
    assert info.value.status_code == 409
    assert info.value.body == {
        "message": "This Idempotency-Key was already used with a different request.",
        "type": "invalid_request_error",
        "param": "Idempotency-Key",
        "code": "idempotency_key_reused",
    }
    assert info.value.response.headers["x-should-retry"] == "false"  # the SDK would retry a 409 otherwise
    assert len(fake.submits) == 1


async def test_keys_are_per_client_key_and_failures_are_not_stored(url: str, fake: FakeFal) -> None:
    await generate(sdk(url, TEAM_A), "shared")
    await generate(sdk(url, TEAM_B), "shared")  # another client's key space
    assert len(fake.submits) == 2
    fake.scenario = FalScenario.content_policy()
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            await generate(sdk(url, TEAM_A), "flaky")
    assert len(fake.submits) == 4  # the failure was not stored: the retry ran again
    fake.scenario = FalScenario.instant()
    await generate(sdk(url, TEAM_A), "flaky")
    replay = await generate(sdk(url, TEAM_A), "flaky")
    assert len(fake.submits) == 5 and replay.headers["idempotent-replayed"] == "true"


async def test_without_the_header_every_request_runs(url: str, fake: FakeFal) -> None:
    client = sdk(url, TEAM_A)
    await generate(client, None)
    await generate(client, None)
    assert len(fake.submits) == 2


async def test_bad_idempotency_key_is_400(url: str, fake: FakeFal) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await generate(sdk(url, TEAM_A), "x" * 256)
    assert info.value.body["param"] == "Idempotency-Key"  # type: ignore[index]
    assert fake.submits == []


def test_redis_record_stays_small_for_a_big_b64_response(
    tmp_path: Path, fal: tuple[FakeFal, LocalServer], redis_url: str, redis_prefix: str
) -> None:
    fal[0].reset()
    fal[0].scenario = FalScenario.instant()
    settings = access_settings(tmp_path, fal[1].url, redis={"url": redis_url, "key_prefix": redis_prefix})
    with gateway(settings) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=TEAM_A, max_retries=0)
        body, again = (
            client.images.with_raw_response.generate(
                model="sandbox-image",
                prompt="noise",
                size="2048x2048",
                n=2,
                response_format="b64_json",
                extra_headers={"Idempotency-Key": "big"},
            ).http_response
            for _ in range(2)
        )
    assert again.headers["idempotent-replayed"] == "true" and again.json() == body.json()
    (record,) = [k for k in keys_with(redis_url, redis_prefix) if ":idempotency:" in k]
    import redis

    size = redis.Redis.from_url(redis_url).strlen(record)
    print(f"response {len(body.content)} bytes, Redis record {size} bytes")
    assert len(body.content) > 100_000 and size < 2_000


async def test_a_replay_whose_images_expired_is_a_conflict_the_sdk_does_not_retry(
    url: str, fake: FakeFal, tmp_path: Path
) -> None:
    """The image storage dropped the images of a live record (a lifecycle rule shorter than the
    idempotency TTL): the official SDK, with its default retries, gets one ConflictError naming
    `idempotency_result_expired`, and no second upstream job runs."""
    import httpx

    sent: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        sent.append(request)

    await generate(sdk(url, TEAM_A), "order-expired")
    for stored in (tmp_path / "images").rglob("*"):
        if stored.is_file():
            stored.unlink()
    http = httpx.AsyncClient(event_hooks={"request": [count]}, timeout=30)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=TEAM_A, max_retries=2, http_client=http)
    with pytest.raises(openai.ConflictError) as info:
        await client.images.generate(
            model="fal-image",
            prompt="a red fox",
            response_format="b64_json",
            extra_headers={"Idempotency-Key": "order-expired"},
        )
    await http.aclose()
    assert info.value.code == "idempotency_result_expired" and info.value.param == "Idempotency-Key"
    assert len(sent) == 1  # x-should-retry: false: the SDK does not retry a 409 it would otherwise retry
    assert len(fake.submits) == 1
