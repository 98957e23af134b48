"""The cost estimate of a served request, from the catalog's route prices.

`price: {per_image: 0.03}` and/or `{per_megapixel: 0.02}` on a route. The estimate is what the
upstream was asked to do: every image it produced (fan-out included) and their megapixels, as the
response's `usage` (`images`, `megapixels`) reports them. A route without a price costs 0.
"""

from __future__ import annotations

from collections.abc import Mapping

from imagegate.core.results import ImageResult
from imagegate.settings import ModelConfig, RoutePrice

__all__ = ["COST_HEADER", "PriceTable", "format_cost"]

COST_HEADER = "x-imagegate-cost-usd"


def format_cost(usd: float) -> str:
    return f"{usd:.4f}"


class PriceTable:
    def __init__(self, prices: Mapping[tuple[str, str, str], RoutePrice]) -> None:
        self._prices = dict(prices)

    @classmethod
    def from_models(cls, models: Mapping[str, ModelConfig]) -> PriceTable:
        return cls(
            {
                (model_id, route.provider, route.model): route.price
                for model_id, config in models.items()
                for route in config.routes
                if route.price is not None
            }
        )

    def cost(self, model: str, result: ImageResult) -> float:
        """The estimate for `result`, served for `model` by the route its headers name."""
        provider = result.headers.get("x-imagegate-provider", "")
        upstream = result.headers.get("x-imagegate-upstream-model", "")
        price = self._prices.get((model, provider, upstream))
        if price is None:
            return 0.0
        images = int(result.usage.get("images", len(result.data)))
        megapixels = float(result.usage.get("megapixels", 0.0))
        return (price.per_image or 0.0) * images + (price.per_megapixel or 0.0) * megapixels
