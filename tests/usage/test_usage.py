"""Prices and the usage ledgers (memory and the real Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tests.redis_support import redis_prefix, redis_url

from imagegate.core.results import ImageResult
from imagegate.settings import ModelConfig, RedisSettings
from imagegate.state.redis import connect
from imagegate.usage import MemoryLedger, PriceTable, RedisLedger, UsageLedger, UsageTotals

__all__ = ["redis_prefix", "redis_url"]


def served(provider: str, upstream: str, images: int, megapixels: float) -> ImageResult:
    return ImageResult(
        created=1,
        data=[],
        size=None,
        output_format="png",
        quality="high",
        background="opaque",
        headers={"x-imagegate-provider": provider, "x-imagegate-upstream-model": upstream},
        usage={"images": images, "megapixels": megapixels},
    )


def test_price_of_the_route_that_served() -> None:
    prices = PriceTable.from_models(
        {
            "m": ModelConfig.model_validate(
                {
                    "routes": [
                        {"provider": "fal", "model": "f", "price": {"per_image": 0.03}},
                        {"provider": "replicate", "model": "r", "price": {"per_megapixel": 0.02, "per_image": 0.01}},
                        {"provider": "sandbox", "model": "s"},
                    ]
                }
            )
        }
    )
    assert prices.cost("m", served("fal", "f", 3, 3.0)) == pytest.approx(0.09)
    assert prices.cost("m", served("replicate", "r", 2, 2.5)) == pytest.approx(0.07)
    assert prices.cost("m", served("sandbox", "s", 1, 1.0)) == 0.0
    assert prices.cost("other", served("fal", "f", 1, 1.0)) == 0.0
    with pytest.raises(ValueError):
        ModelConfig.model_validate({"routes": [{"provider": "fal", "model": "f", "price": {"per_image": -1}}]})


@pytest.fixture(params=["memory", "redis"])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[UsageLedger]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    client = connect(RedisSettings(url=request.getfixturevalue("redis_url")))
    assert client is not None
    yield RedisLedger(client, prefix=request.getfixturevalue("redis_prefix"))
    await client.aclose()


async def test_totals_add_up_exactly(ledger: UsageLedger) -> None:
    for _ in range(3):
        await ledger.record("a", images=2, megapixels=1.048576, cost_usd=0.1)
    await ledger.record("b", images=1, megapixels=0.5, cost_usd=0.000001)
    totals = await ledger.totals()
    assert totals == {"a": UsageTotals(3, 6, 3_145_728, 300_000), "b": UsageTotals(1, 1, 500_000, 1)}
    assert totals["a"].as_json("a") == {
        "object": "imagegate.usage",
        "key": "a",
        "requests": 3,
        "images": 6,
        "megapixels": 3.145728,
        "cost_usd": 0.3,
    }
    assert await ledger.totals(["b", "nobody"]) == {"b": totals["b"], "nobody": UsageTotals()}
