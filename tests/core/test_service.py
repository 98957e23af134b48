"""The pipeline with scripted providers: retries, fallback, fan-out, deadline, cancellation, delivery."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from PIL import Image

from imagegate.core.catalog import Catalog
from imagegate.core.errors import (
    ContentPolicyViolation,
    GatewayError,
    InvalidRequest,
    ProviderNotConfigured,
    ProviderUnavailable,
    RateLimited,
    UpstreamTimeout,
)
from imagegate.core.imaging import ImagePool
from imagegate.core.params import ParamTable
from imagegate.core.request import ImageRequest, InputImage, Operation
from imagegate.core.results import DryRunResult, ImageResult
from imagegate.core.service import ImageService
from imagegate.providers.base import CallContext, Provider, ProviderImage, ProviderResult, Route
from imagegate.providers.sandbox.tables import EDIT, GENERATE
from imagegate.settings import ModelConfig, RouteConfig, Settings
from imagegate.storage.base import Storage, StoredImage


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


class MemoryStorage(Storage):
    def __init__(self) -> None:
        self.items: dict[str, StoredImage] = {}

    async def put(self, data: bytes, *, content_type: str, extension: str, ttl_seconds: int) -> str:
        image_id = f"img{len(self.items)}.{extension}"
        self.items[image_id] = StoredImage(data, content_type, 0.0)
        return image_id

    async def get(self, image_id: str) -> StoredImage | None:
        return self.items.get(image_id)


class Scripted(Provider):
    """Answers each run() with the next scripted item: an exception, a delay, or an image size."""

    def __init__(self, name: str, script: list[Any], *, configured: bool = True) -> None:
        super().__init__(httpx.AsyncClient(), None)
        self.name = name  # type: ignore[misc]
        self.script = script
        self.configured = configured
        self.payloads: list[dict[str, Any]] = []
        self.cancelled = 0

    def check_configured(self) -> None:
        if not self.configured:
            raise ProviderNotConfigured(f"provider {self.name} is not configured: set {self.name.upper()}_KEY")

    def models(self) -> Sequence[str]:
        return ()

    def table(self, model: str, operation: Operation) -> ParamTable:
        return GENERATE

    async def prepare_images(self, images: Any, route: Route, *, dry_run: bool = False) -> list[str]:
        return []

    async def run(self, payload: dict[str, Any], route: Route, ctx: CallContext) -> ProviderResult:
        self.payloads.append(payload)
        step = self.script.pop(0) if self.script else (64, 48)
        try:
            if isinstance(step, BaseException):
                raise step
            if isinstance(step, float):
                await asyncio.sleep(step)
                step = (64, 48)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        count = int(payload.get("num_images", 1))
        return ProviderResult(
            images=[ProviderImage(data=png(*step), content_type="image/png") for _ in range(count)],
            request_id=f"{self.name}-{len(self.payloads)}",
        )


def make_service(*providers: Scripted, deadline: float = 5.0, **routing: Any) -> ImageService:
    settings = Settings(
        models={"m": ModelConfig(routes=[RouteConfig(provider=p.name, model="x") for p in providers])},
        routing={"deadline_seconds": deadline, "backoff_base": 0.01, "backoff_max": 0.02, **routing},
    )
    return ImageService(
        settings=settings,
        catalog=Catalog.from_config(settings.models),
        providers={p.name: p for p in providers},
        storage=MemoryStorage(),
        pool=ImagePool(2),
    )


def request(**fields: Any) -> ImageRequest:
    return ImageRequest(operation="generate", prompt="a cat", model="m", **fields)


async def serve(service: ImageService, req: ImageRequest) -> ImageResult:
    result = await service.run(req, request_id="req_1", base_url="http://gw")
    assert isinstance(result, ImageResult)
    return result


async def test_happy_path_b64_exact_size_and_headers() -> None:
    a = Scripted("a", [(100, 80)])
    result = await serve(make_service(a), request(size="64x64", response_format="b64_json", output_format="jpeg"))
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert image.size == (64, 64) and image.format == "JPEG"
    assert result.size == "64x64" and result.output_format == "jpeg" and result.background == "opaque"
    assert result.headers["x-imagegate-provider"] == "a"
    assert result.headers["x-imagegate-upstream-request-id"] == "a-1"
    assert "size=converted" in result.headers["x-imagegate-params"]


async def test_url_delivery_rehosts() -> None:
    service = make_service(Scripted("a", []))
    result = await serve(service, request(response_format="url"))
    url = result.data[0].url or ""
    assert url.startswith("http://gw/v1/files/images/img0.png")
    stored = await service.storage.get("img0.png")
    assert stored is not None and stored.content_type == "image/png"


async def test_retryable_error_is_retried_then_succeeds() -> None:
    a = Scripted("a", [ProviderUnavailable("busy"), RateLimited("slow down", retry_after=0.01)])
    result = await serve(make_service(a), request())
    assert len(a.payloads) == 3 and len(result.data) == 1


async def test_non_retryable_error_is_not_retried_but_falls_back() -> None:
    a = Scripted("a", [ProviderUnavailable("accepted, then failed", retryable=False)])
    b = Scripted("b", [])
    result = await serve(make_service(a, b), request())
    assert len(a.payloads) == 1 and len(b.payloads) == 1
    assert result.headers["x-imagegate-provider"] == "b"


async def test_exhausted_retries_fall_back() -> None:
    a = Scripted("a", [ProviderUnavailable("503")] * 3)
    b = Scripted("b", [])
    result = await serve(make_service(a, b, max_attempts=3), request())
    assert len(a.payloads) == 3 and result.headers["x-imagegate-provider"] == "b"


async def test_client_errors_never_fall_back() -> None:
    a = Scripted("a", [ContentPolicyViolation("flagged")])
    b = Scripted("b", [])
    with pytest.raises(ContentPolicyViolation):
        await serve(make_service(a, b), request())
    assert b.payloads == []


async def test_unconfigured_provider_falls_back_and_all_unconfigured_is_clear() -> None:
    a = Scripted("fal", [], configured=False)
    b = Scripted("b", [])
    assert (await serve(make_service(a, b), request())).headers["x-imagegate-provider"] == "b"
    c = Scripted("replicate", [], configured=False)
    with pytest.raises(ProviderNotConfigured) as info:
        await serve(make_service(Scripted("fal", [], configured=False), c), request())
    assert "set FAL_KEY" in info.value.message and "set REPLICATE_KEY" in info.value.message
    assert info.value.status == 503


async def test_fan_out_runs_in_parallel_with_seeds() -> None:
    a = Scripted("a", [0.2, 0.2, 0.2])
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await serve(make_service(a), request(n=10, seed=5))
    assert loop.time() - started < 0.5  # three 0.2 s calls ran concurrently
    assert len(result.data) == 10
    assert sorted(p["seed"] for p in a.payloads) == [5, 9, 13]
    assert sorted(p["num_images"] for p in a.payloads) == [2, 4, 4]


async def test_one_failed_call_fails_the_request_and_cancels_the_rest() -> None:
    a = Scripted("a", [1.0, ContentPolicyViolation("flagged"), 1.0])
    with pytest.raises(ContentPolicyViolation):
        await serve(make_service(a), request(n=12))
    assert a.cancelled == 2


async def test_deadline_cancels_upstream_and_times_out() -> None:
    a = Scripted("a", [5.0])
    with pytest.raises(UpstreamTimeout) as info:
        await serve(make_service(a, deadline=0.2), request())
    assert a.cancelled == 1 and info.value.status == 504


async def test_dry_run_returns_payloads_without_calling() -> None:
    a = Scripted("a", [])
    result = await make_service(a).run(
        request(size="640x480", n=2, seed=1), request_id="r", base_url="http://gw", dry_run=True
    )
    assert isinstance(result, DryRunResult)
    assert result.payloads == [
        {"prompt": "a cat", "num_images": 2, "size": {"width": 640, "height": 480}, "seed": 1}
    ]
    assert result.params == {"size": "converted", "seed": "passthrough", "n": "renamed"}
    assert a.payloads == []


async def test_unknown_model_and_bad_operation() -> None:
    service = make_service(Scripted("a", []))
    with pytest.raises(GatewayError) as info:
        await serve(service, ImageRequest(operation="generate", prompt="p", model="nope"))
    assert info.value.status == 404 and info.value.code == "model_not_found"
    with pytest.raises(InvalidRequest) as bad:
        await serve(service, request(size="14000x14000"))
    assert bad.value.param == "size"


async def test_rejected_parameters_fail_before_any_upload() -> None:
    class Uploading(Scripted):
        uploads = 0

        async def prepare_images(self, images: Any, route: Route, *, dry_run: bool = False) -> list[str]:
            Uploading.uploads += len(images)
            return ["ref"] * len(images)

        def table(self, model: str, operation: Operation) -> ParamTable:
            return EDIT

    a = Uploading("a", [])
    service = make_service(a)
    image = InputImage(data=png(8, 8), format="png", width=8, height=8)
    edit = ImageRequest(operation="edit", prompt="p", model="m", images=[image], background="transparent")
    with pytest.raises(InvalidRequest) as info:
        await serve(service, edit)
    assert info.value.param == "background" and Uploading.uploads == 0


async def test_costly_failures_tell_clients_not_to_retry() -> None:
    accepted_then_failed = Scripted("a", [ProviderUnavailable("runner died", retryable=False, accepted=True)])
    with pytest.raises(ProviderUnavailable) as info:
        await serve(make_service(accepted_then_failed), request())
    assert info.value.costly  # rendered with x-should-retry: false

    never_accepted = Scripted("a", [ProviderUnavailable("503")] * 3)
    with pytest.raises(ProviderUnavailable) as info:
        await serve(make_service(never_accepted), request())
    assert not info.value.costly  # nothing was billed: the SDK may retry

    slow = Scripted("a", [5.0])
    with pytest.raises(UpstreamTimeout) as timeout:
        await serve(make_service(slow, deadline=0.2), request())
    assert timeout.value.costly

    # a costly failure on the first route stays costly when the last route fails cheaply
    first = Scripted("a", [ProviderUnavailable("runner died", accepted=True)])
    second = Scripted("b", [ProviderUnavailable("503")] * 3)
    with pytest.raises(ProviderUnavailable) as info:
        await serve(make_service(first, second, fallback_after_accepted=True), request())
    assert info.value.costly and info.value.provider == "b"


async def test_an_unconfigured_fallback_does_not_hide_the_real_failure() -> None:
    a = Scripted("a", [ProviderUnavailable("runner died", retryable=False)])
    b = Scripted("b", [], configured=False)
    with pytest.raises(ProviderUnavailable) as info:
        await serve(make_service(a, b), request())
    assert info.value.message == "runner died" and info.value.provider == "a"


async def test_the_deadline_covers_delivery() -> None:
    class SlowDownload(Scripted):
        async def run(self, payload: dict[str, Any], route: Route, ctx: CallContext) -> ProviderResult:
            self.payloads.append(payload)
            return ProviderResult(images=[ProviderImage(url="https://cdn.example/a.png")])

        async def fetch(self, image: ProviderImage) -> bytes:
            await asyncio.sleep(5)
            return png(8, 8)

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout) as info:
        await serve(make_service(SlowDownload("a", []), deadline=0.3), request())
    assert loop.time() - started < 2 and info.value.costly


async def test_unexpected_failures_are_a_costly_internal_error() -> None:
    a = Scripted("a", [ValueError("an upstream answer nobody foresaw")])
    with pytest.raises(GatewayError) as info:
        await serve(make_service(a), request())
    assert info.value.status == 500 and info.value.code == "internal_error" and info.value.costly
    assert "foresaw" not in info.value.message  # internals stay in the logs


async def test_upstream_ids_unsafe_for_a_header_are_dropped() -> None:
    class OddIds(Scripted):
        async def run(self, payload: dict[str, Any], route: Route, ctx: CallContext) -> ProviderResult:
            result = await super().run(payload, route, ctx)
            return ProviderResult(images=result.images, request_id="id\r\nx-evil: 1")

    result = await serve(make_service(OddIds("a", [])), request())
    assert "x-imagegate-upstream-request-id" not in result.headers


async def test_a_route_timeout_falls_back_to_the_next_route() -> None:
    slow, fast = Scripted("a", [5.0]), Scripted("b", [])
    settings = Settings(
        models={"m": ModelConfig(routes=[RouteConfig(provider="a", model="x", timeout_seconds=0.2),
                                         RouteConfig(provider="b", model="x")])},
        routing={"deadline_seconds": 5, "fallback_after_accepted": True},
    )
    service = ImageService(settings=settings, catalog=Catalog.from_config(settings.models),
                           providers={"a": slow, "b": fast}, storage=MemoryStorage(), pool=ImagePool(2))
    result = await serve(service, request())
    assert result.headers["x-imagegate-provider"] == "b" and slow.cancelled == 1


async def test_a_route_pin_serves_that_route_only_and_never_falls_back() -> None:
    a, b = Scripted("a", []), Scripted("b", [ProviderUnavailable("down", retryable=False)] * 3)
    service = make_service(a, b)
    for pin in ("1", "b", "b:x"):
        with pytest.raises(ProviderUnavailable):
            await serve(service, request(route=pin))
    assert a.payloads == [] and len(b.payloads) == 3
    result = await serve(service, request(route="0"))
    assert result.headers["x-imagegate-provider"] == "a"
    dry = await service.run(request(route="b"), request_id="r", base_url="http://gw", dry_run=True)
    assert isinstance(dry, DryRunResult) and dry.provider == "b"
    assert dry.routes == [{"provider": "a", "upstream_model": "x"}, {"provider": "b", "upstream_model": "x"}]


@pytest.mark.parametrize("pin", ["2", "c", "a:y", "9" * 5000, "-1", "\u0661"])
async def test_an_unknown_route_pin_is_a_400_naming_the_header(pin: str) -> None:
    a = Scripted("a", [])
    with pytest.raises(InvalidRequest) as info:
        await serve(make_service(a, Scripted("b", [])), request(route=pin))
    assert info.value.status == 400 and info.value.param == "x-imagegate-route"
    assert "0 (a:x), 1 (b:x)" in info.value.message and a.payloads == []


async def test_an_accepted_job_is_never_retried_and_does_not_fall_back_by_default() -> None:
    a = Scripted("a", [ProviderUnavailable("runner died after accepting", accepted=True)])  # retryable by class
    b = Scripted("b", [])
    with pytest.raises(ProviderUnavailable) as info:
        await serve(make_service(a, b), request())
    assert len(a.payloads) == 1 and b.payloads == [] and info.value.costly and info.value.accepted


async def test_a_sibling_accepted_in_a_fan_out_blocks_the_fallback() -> None:
    # n=8 at 4 per call: the first call succeeds (paid), the second is refused (not accepted itself)
    a = Scripted("a", [(64, 48), ProviderNotConfigured("refused")])
    b = Scripted("b", [])
    with pytest.raises(ProviderNotConfigured) as info:
        await serve(make_service(a, b, fanout_concurrency=1), request(n=8))
    assert b.payloads == [] and info.value.accepted and info.value.costly


async def test_a_route_timeout_after_acceptance_does_not_fall_back_by_default() -> None:
    slow, fast = Scripted("a", [5.0]), Scripted("b", [])
    settings = Settings(
        models={"m": ModelConfig(routes=[RouteConfig(provider="a", model="x", timeout_seconds=0.2),
                                         RouteConfig(provider="b", model="x")])},
        routing={"deadline_seconds": 5},
    )
    service = ImageService(settings=settings, catalog=Catalog.from_config(settings.models),
                           providers={"a": slow, "b": fast}, storage=MemoryStorage(), pool=ImagePool(2))
    with pytest.raises(UpstreamTimeout) as info:
        await serve(service, request())
    assert fast.payloads == [] and slow.cancelled == 1 and info.value.costly
