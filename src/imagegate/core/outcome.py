"""What one served route hands back: its `x-imagegate-*` headers and the `ImageResult` built from
the delivered images."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from imagegate.core.emulate import Delivered
from imagegate.core.params import Mode
from imagegate.core.plan import Plan
from imagegate.core.redact import scrub
from imagegate.core.request import ImageRequest
from imagegate.core.results import ImageResult, resolved_quality
from imagegate.providers.base import Provider, ProviderResult, Route

__all__ = ["image_result", "route_headers"]

_HEADER_SAFE = re.compile(r"\A[\x21-\x7e]{1,200}\Z")  # an upstream id goes into a response header verbatim


def route_headers(plan: Plan, provider: Provider, route: Route, results: Sequence[ProviderResult]) -> dict[str, str]:
    headers = {
        "x-imagegate-params": plan.header(),
        "x-imagegate-provider": provider.name,
        "x-imagegate-upstream-model": route.model,
    }
    ids = [r.request_id for r in results if r.request_id and _HEADER_SAFE.match(r.request_id)
           and scrub(r.request_id) == r.request_id]  # an upstream that echoes a key into its ids
    if ids:
        headers["x-imagegate-upstream-request-id"] = ",".join(ids)
    return headers


def image_result(
    request: ImageRequest,
    plan: Plan,
    provider: Provider,
    route: Route,
    results: Sequence[ProviderResult],
    delivered: Sequence[Delivered],
) -> ImageResult:
    sizes = {(d.width, d.height) for d in delivered}
    size = None
    if len(sizes) == 1:
        width, height = next(iter(sizes))
        if width and height:
            size = f"{width}x{height}"
    honoured = plan.outcomes.get("quality") in (Mode.PASSTHROUGH, Mode.RENAMED, Mode.CONVERTED)
    quality = resolved_quality(request.quality, honoured=honoured)
    result = ImageResult(
        created=int(time.time()),
        data=[d.image for d in delivered],
        size=size,
        output_format=delivered[0].format if delivered else (request.output_format or "png"),
        quality=quality,
        background="transparent" if any(d.has_alpha for d in delivered) else "opaque",
        headers=route_headers(plan, provider, route, results),
    )
    # What was produced (the cost estimate and the per-key usage counters read it).
    result.usage["images"] = len(delivered)
    result.usage["megapixels"] = round(sum((d.width or 0) * (d.height or 0) for d in delivered) / 1e6, 6)
    return result
