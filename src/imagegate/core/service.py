"""The request pipeline: plan -> execute (retries, fallback, fan-out, deadline) -> post-process -> respond.

For each route of the model, in order: check the provider is configured, resolve the size
target against the model's presets, let the adapter prepare image references, apply the
route's parameter table (the one interpreter), run the upstream calls (`n` fan-out in
parallel, bounded; each call retried with backoff only when its error says it is safe),
then deliver every image. A failure that allows it (`fallback`) moves on to the next route;
client errors never do.

Never paying twice: a call is retried only when its error is `retryable` and not `accepted` (the
transports mark every failure that came after the upstream took the job). A route whose upstream
accepted any job (a call that failed after acceptance, succeeded, or was cancelled mid-call: it
may have been taken) does not fall back to the next route unless
`routing.fallback_after_accepted` is on, and its failure is `costly` (`x-should-retry: false`).
`_RouteWork` records that per route.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from imagegate.core import imaging, telemetry
from imagegate.core.catalog import Catalog, CatalogEntry
from imagegate.core.deadline import within
from imagegate.core.emulate import Delivered, OutputSpec, deliver_image
from imagegate.core.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    ProviderNotConfigured,
    UpstreamError,
    UpstreamTimeout,
)
from imagegate.core.fetch import ImageFetcher, fetch_image
from imagegate.core.outcome import image_result, route_headers
from imagegate.core.params import BuildContext
from imagegate.core.plan import Plan, apply_table
from imagegate.core.presets import QWEN_PRESETS
from imagegate.core.request import ImageRequest, InputImage, check_mask_size
from imagegate.core.results import DryRunResult, ImageResult
from imagegate.core.sizes import Size, resolve_target
from imagegate.providers.base import CallContext, Provider, ProviderResult, Route
from imagegate.providers.common import backoff_delay
from imagegate.settings import Settings
from imagegate.storage.base import Storage

__all__ = ["ImageFetcher", "ImageService"]

log = logging.getLogger("imagegate.service")


@dataclass(slots=True)
class _Attempted:
    route: Route
    error: GatewayError


@dataclass(slots=True)
class _RouteWork:
    """Did the upstream take (or may it have taken) any job of this route?"""

    accepted: bool = False


# The current route's record, set by `run` for each route and shared by its fan-out tasks (they
# copy the context), so the calls report acceptance without threading it through every signature.
_ROUTE_WORK: contextvars.ContextVar[_RouteWork] = contextvars.ContextVar("imagegate_route_work")


class ImageService:
    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        providers: Mapping[str, Provider],
        storage: Storage,
        pool: imaging.ImagePool,
        fetcher: ImageFetcher | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.providers = dict(providers)
        self.storage = storage
        self.pool = pool
        self.fetcher = fetcher
        for entry in catalog:
            for route in entry.routes:
                self._check_route(entry, route)

    def _check_route(self, entry: CatalogEntry, route: Route) -> None:
        """Misconfiguration fails when the app is built, not at the first request."""
        provider = self.providers.get(route.provider)
        if provider is None:
            raise ValueError(f"model {entry.id}: unknown provider {route.provider!r}")
        known = provider.models()
        if known and route.model not in known:
            raise ValueError(f"model {entry.id}: provider {route.provider} has no table for {route.model!r}")

    async def run(
        self,
        request: ImageRequest,
        *,
        request_id: str,
        base_url: str,
        dry_run: bool = False,
        on_plan: Callable[[Mapping[str, str]], None] | None = None,
    ) -> ImageResult | DryRunResult:
        """Serve one validated request. Raises GatewayError subclasses. `on_plan` receives the
        route's `x-imagegate-*` headers as soon as a route is planned (a stream's headers go out
        before the result exists)."""
        entry = self.catalog.get(request.model)
        telemetry.note_request(model=entry.id, operation=request.operation, prompt=request.prompt)
        routes = entry.routes if request.route is None else entry.pinned(request.route)
        started = time.monotonic()
        deadline = started + self.settings.routing.deadline_seconds
        if dry_run:
            route, unavailable = self._serving_route(routes)
            dry = await self._dry_run(entry, route, self.providers[route.provider], request)
            dry.unavailable = unavailable
            return dry

        failures: list[_Attempted] = []
        for route in routes:
            provider = self.providers[route.provider]
            work = _RouteWork()
            _ROUTE_WORK.set(work)
            now = time.monotonic()
            route_deadline = deadline if route.timeout is None else min(deadline, now + route.timeout)
            try:
                provider.check_configured()
                # One deadline covers everything a route does: uploads, upstream calls, delivery.
                with within(max(0.0, route_deadline - now)):
                    return await self._serve(
                        entry, route, provider, request, request_id, base_url, route_deadline, on_plan
                    )
            except TimeoutError:
                failure: GatewayError = UpstreamTimeout(f"{provider.name} did not finish before the deadline.")
                failure.costly = True  # the client waited the whole deadline: a blind retry waits (and pays) again
            except GatewayError as exc:
                failure = exc
            except Exception as exc:  # a defect or an upstream answer nobody foresaw: never a retried 500
                log.exception("%s: route %s:%s failed unexpectedly", request_id, provider.name, route.model)
                internal = InternalError("The gateway failed while serving this request.")
                internal.costly = True  # the upstream may have done (and billed) the work
                internal.provider = provider.name
                raise internal from exc
            failure.provider = failure.provider or provider.name
            failure.accepted = failure.accepted or work.accepted  # accepted work is costly
            failures.append(_Attempted(route, failure))
            failure.costly = any(f.error.costly for f in failures)
            may_fall_back = failure.fallback and (
                not failure.accepted or self.settings.routing.fallback_after_accepted
            )
            if not may_fall_back or time.monotonic() >= deadline:
                raise failure  # the HTTP layer logs what reaches the client
            if route is routes[-1]:
                break
            telemetry.note_fallback(entry.id)
            log.warning(
                "%s: route %s:%s failed (%s %s: %s); trying the next route",
                request_id, provider.name, route.model, failure.status, failure.code, failure.message,
            )
        final = _final_error(failures)
        final.costly = any(f.error.costly for f in failures)
        raise final

    # -- planning ---------------------------------------------------------------------------

    def _serving_route(self, routes: Sequence[Route]) -> tuple[Route, GatewayError | None]:
        """The route a real request would be planned on: the first whose provider is configured.
        None is: the first route, and the error the real request would answer."""
        skipped: list[_Attempted] = []
        for route in routes:
            try:
                self.providers[route.provider].check_configured()
            except ProviderNotConfigured as exc:
                skipped.append(_Attempted(route, exc))
                continue
            return route, None
        return routes[0], _final_error(skipped)

    async def _plan(
        self, route: Route, provider: Provider, request: ImageRequest, *, dry_run: bool
    ) -> Plan:
        try:
            table = provider.table(route.model, request.operation)
        except KeyError:
            verb = "image edits" if request.operation == "edit" else "image generations"
            raise InvalidRequest(f"The model `{request.model}` does not support {verb}.", param="model") from None
        images = list(request.images)
        mask = request.mask
        if not provider.accepts_image_urls:
            images = [await self._materialize(image, "images") for image in images]
            mask = await self._materialize(mask, "mask") if mask is not None else None
        if images and mask is not None:
            check_mask_size(images[0], mask)  # fetched URL images: their sizes are known only now
        first = images[0] if images else None
        input_size = Size(first.width, first.height) if first and first.width and first.height else None
        target = resolve_target(
            size=request.size,
            aspect_ratio=request.aspect_ratio,
            resolution=request.resolution,
            presets=provider.size_presets(route.model) or QWEN_PRESETS,
            input_size=input_size,
        )
        if target is not None and target.size.pixels > self.settings.limits.max_pixels:
            raise InvalidRequest(
                f"The requested size {target.size} exceeds the gateway's limit of "
                f"{self.settings.limits.max_pixels} pixels.",
                param="size",
            )
        ctx = BuildContext(request.operation, target=target, input_size=input_size, options=route.options)
        # Validate every parameter before anything is uploaded: a request the table rejects costs nothing.
        placeholder_mask = None if mask is None else "<mask>"
        checked = apply_table(table, request, ctx, image_refs=["<image>"] * len(images), mask_ref=placeholder_mask)
        if not images and mask is None:
            return checked  # nothing to upload: the checked plan is the plan (one table pass per request)
        refs = await provider.prepare_images(images, route, dry_run=dry_run) if images else []
        mask_ref = None
        if mask is not None:
            (mask_ref,) = await provider.prepare_images([mask], route, dry_run=dry_run)
        return apply_table(table, request, ctx, image_refs=refs, mask_ref=mask_ref)

    async def _materialize(self, image: InputImage, param: str) -> InputImage:
        """Bytes for a URL input (`param` is `images` or `mask`), for providers that need bytes."""
        if image.data is not None:
            return image
        if self.fetcher is None:
            raise InvalidRequest("This gateway does not fetch image URLs.", param=param)
        return await fetch_image(
            image, self.fetcher, pool=self.pool, max_pixels=self.settings.limits.max_pixels, param=param
        )

    async def _dry_run(
        self, entry: CatalogEntry, route: Route, provider: Provider, request: ImageRequest
    ) -> DryRunResult:
        plan = await self._plan(route, provider, request, dry_run=True)
        return DryRunResult(
            model=entry.id,
            provider=provider.name,
            upstream_model=route.model,
            payloads=plan.payloads,
            params={param: mode.value for param, mode in plan.outcomes.items()},
            notes=plan.notes,
            target_size=str(plan.target.size) if plan.target else None,
            headers=route_headers(plan, provider, route, []),
            routes=[{"provider": r.provider, "upstream_model": r.model} for r in entry.routes],
        )

    # -- execution --------------------------------------------------------------------------

    async def _serve(
        self,
        entry: CatalogEntry,
        route: Route,
        provider: Provider,
        request: ImageRequest,
        request_id: str,
        base_url: str,
        deadline: float,
        on_plan: Callable[[Mapping[str, str]], None] | None,
    ) -> ImageResult:
        plan = await self._plan(route, provider, request, dry_run=False)
        if on_plan is not None:
            on_plan(route_headers(plan, provider, route, []))
        ctx = CallContext(request_id=request_id, deadline=deadline, operation=request.operation)
        results = await self._execute(plan, route, provider, ctx)
        try:
            delivered = await self._deliver(request, plan, route, provider, results, base_url)
        except GatewayError as exc:
            exc.costly = True
            exc.fallback = False  # the upstream work is done and paid for: do not redo it elsewhere
            raise
        telemetry.note_images(provider.name, len(delivered))
        return image_result(request, plan, provider, route, results, delivered)

    async def _execute(
        self, plan: Plan, route: Route, provider: Provider, ctx: CallContext
    ) -> list[ProviderResult]:
        if len(plan.payloads) == 1:  # the common case: no task group, no extra task (hot path)
            return [await self._call_with_retries(dict(plan.payloads[0]), route, provider, ctx)]
        limit = asyncio.Semaphore(max(1, self.settings.routing.fanout_concurrency))

        async def one(payload: dict[str, object]) -> ProviderResult:
            async with limit:
                return await self._call_with_retries(payload, route, provider, ctx)

        try:  # the route's deadline (set around the whole route in `run`) cancels every call
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(dict(payload))) for payload in plan.payloads]
        except BaseExceptionGroup as group_error:
            # One call failed: the others were cancelled (and cancelled upstream). No half answers.
            first = _first_gateway_error(group_error)
            if first is None:
                raise
            raise first from None  # `run` folds in whether any call of the route was accepted
        return [task.result() for task in tasks]

    async def _call_with_retries(
        self, payload: dict[str, object], route: Route, provider: Provider, ctx: CallContext
    ) -> ProviderResult:
        routing = self.settings.routing
        work = _ROUTE_WORK.get(None) or _RouteWork()
        attempt = 0
        while True:
            try:
                with telemetry.upstream_call(provider.name):
                    result = await provider.run(payload, route, ctx)
            except GatewayError as exc:
                exc.provider = provider.name
                work.accepted = work.accepted or exc.accepted
                attempt += 1
                if exc.accepted or not exc.retryable or attempt >= routing.max_attempts:
                    raise
                delay = backoff_delay(
                    attempt - 1, base=routing.backoff_base, cap=routing.backoff_max, retry_after=exc.retry_after
                )
                if time.monotonic() + delay >= ctx.deadline:
                    raise
                telemetry.note_retry(provider.name)
                await asyncio.sleep(delay)
            except BaseException:
                work.accepted = True  # cancelled (or broken) mid-call: the upstream may have taken it
                raise
            else:
                work.accepted = True  # done upstream, and paid for
                return result

    async def _deliver(
        self,
        request: ImageRequest,
        plan: Plan,
        route: Route,
        provider: Provider,
        results: Sequence[ProviderResult],
        base_url: str,
    ) -> list[Delivered]:
        images = [(image, result.revised_prompt) for result in results for image in result.images]
        if len(images) < request.n:
            raise UpstreamError(
                f"{provider.name} returned {len(images)} image(s) where {request.n} were requested."
            )
        delivery = self.settings.delivery
        url_mode: Literal["rehost", "passthrough"] = route.options.get("url_mode") or delivery.url_mode
        spec = OutputSpec(
            format=request.output_format or "png",
            size=plan.target.size if plan.target else None,
            compression=request.output_compression,
            background=request.background,
            response_format=request.response_format or delivery.default_response_format,
            url_mode=url_mode,
            max_pixels=self.settings.limits.max_pixels,
            ttl_seconds=self.settings.storage.ttl_seconds,
            public_base_url=(delivery.public_base_url or base_url).rstrip("/"),
        )
        deliveries = [
            deliver_image(image, spec, provider=provider, storage=self.storage, pool=self.pool, revised_prompt=revised)
            for image, revised in images[: request.n]
        ]
        if len(deliveries) == 1:  # the common case: no task for one image (hot path)
            return [await deliveries[0]]
        return list(await asyncio.gather(*deliveries))


def _first_gateway_error(group: BaseExceptionGroup[BaseException]) -> GatewayError | None:
    for exc in group.exceptions:
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_gateway_error(exc)
            if found is not None:
                return found
    return None


def _final_error(failures: Sequence[_Attempted]) -> GatewayError:
    """All routes failed. If none was configured, say what to set; otherwise the last real failure
    (a later unconfigured route must not hide why a configured one failed)."""
    real = [f.error for f in failures if not isinstance(f.error, ProviderNotConfigured)]
    if not real:
        message = "; ".join(f.error.message for f in failures)
        return ProviderNotConfigured(f"No provider for this model is configured: {message}.")
    return real[-1]
