"""The Replicate adapter: Qwen image models through Replicate's predictions API.

Inputs go as `data:` URIs up to `inline_max_bytes` (256 KB; route option `inline_max_bytes`
overrides), larger ones through the Files API; the caller's http(s) URLs pass through. One
`run` is one prediction (sync mode, then polling); it is canceled upstream when the call is
cancelled. Outputs are URLs (downloaded with the token only on Replicate hosts) or data URIs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import httpx

from imagegate.core.errors import GatewayError, InvalidRequest, ProviderNotConfigured
from imagegate.core.params import ParamTable
from imagegate.core.presets import QWEN_PRESETS
from imagegate.core.request import InputImage, Operation
from imagegate.core.sizes import SizePresets
from imagegate.providers.base import CallContext, Provider, ProviderResult, Route
from imagegate.providers.common import best_effort
from imagegate.providers.replicate.prediction import Prediction
from imagegate.providers.replicate.tables import MODELS
from imagegate.providers.replicate.transport import ReplicateTransport, output_images
from imagegate.providers.resume import UpstreamCall, UpstreamHooks

__all__ = ["ReplicateProvider"]


log = logging.getLogger("imagegate.providers.replicate")

class ReplicateProvider(Provider):
    name = "replicate"

    def __init__(self, http: httpx.AsyncClient, settings: Any) -> None:
        super().__init__(http, settings)
        # Cleanups that outlive a cancelled `run` (a create still in flight when the caller left).
        self._cleanups: set[asyncio.Future[None]] = set()

    @property
    def _config(self) -> Any:
        return self.settings.providers.replicate

    def check_configured(self) -> None:
        if self._config.api_token is None:
            raise ProviderNotConfigured("provider replicate is not configured: set REPLICATE_API_TOKEN")

    def models(self) -> Sequence[str]:
        return tuple(MODELS)

    def table(self, model: str, operation: Operation) -> ParamTable:
        return MODELS[model][operation]

    def size_presets(self, model: str) -> SizePresets:
        return QWEN_PRESETS

    def transport(self) -> ReplicateTransport:
        self.check_configured()
        config = self._config
        return ReplicateTransport(
            self.http,
            token=config.api_token.get_secret_value(),
            base_url=config.base_url,
            wait_seconds=config.wait_seconds,
            poll_interval=config.poll_interval,
            poll_max_interval=config.poll_max_interval,
        )

    async def prepare_images(self, images: Sequence[InputImage], route: Route, *, dry_run: bool = False) -> list[str]:
        """`data:` URI up to `inline_max_bytes`, else a Files API upload's `urls.get` (a placeholder
        with `dry_run`); a caller's URL is passed through."""
        inline_max = int(route.options.get("inline_max_bytes", self._config.inline_max_bytes))

        async def prepare(index: int, image: InputImage) -> str:
            if image.data is None:
                if image.url is None:
                    raise InvalidRequest("An input image has neither bytes nor a URL.", param="image")
                return image.url
            if len(image.data) <= inline_max:
                return image.data_uri()
            filename = image.filename or f"image-{index}.{image.format or 'bin'}"
            if dry_run:
                return f"<upload via POST /files: {filename}, {image.mime}, {len(image.data)} bytes>"
            return await self.transport().upload(image, filename=filename)

        return list(await asyncio.gather(*(prepare(i, image) for i, image in enumerate(images))))

    async def run(self, payload: dict[str, Any], route: Route, ctx: CallContext) -> ProviderResult:
        transport = self.transport()
        if ctx.hooks is not None:
            return await self._run_job(transport, payload, route, ctx, ctx.hooks)
        prediction = await self._create(transport, payload, route, ctx)
        return await self._follow(transport, prediction, payload, ctx)

    async def _create(
        self, transport: ReplicateTransport, payload: dict[str, Any], route: Route, ctx: CallContext
    ) -> Prediction:
        create = asyncio.ensure_future(transport.create(route.model, payload, deadline=ctx.deadline))
        try:
            return await asyncio.shield(create)
        except asyncio.CancelledError:
            self._cancel_once_created(transport, create)
            raise

    async def _run_job(
        self, transport: ReplicateTransport, payload: dict[str, Any], route: Route, ctx: CallContext,
        hooks: UpstreamHooks,
    ) -> ProviderResult:
        """An async job's call: the create answers at once (`Prefer: wait=1`), so the prediction's id
        is persisted before the work; a prediction created in an earlier run is followed again."""
        transport.wait_seconds = 1
        # the job holds its provider slot until the outcome is seen: poll a quick prediction soon
        transport.poll_interval = min(transport.poll_interval, self._config.job_poll_interval)
        async with hooks.call(self.name, route.model, payload) as call:
            if call.handle is not None:
                prediction = Prediction({"id": call.handle["request_id"], "urls": call.handle.get("urls") or {}})
                log.info("replicate resuming prediction %s", prediction.id)
            else:
                prediction = await self._create(transport, payload, route, ctx)
            return await self._follow(transport, prediction, payload, ctx, call)

    async def _follow(
        self, transport: ReplicateTransport, prediction: Prediction, payload: dict[str, Any], ctx: CallContext,
        call: UpstreamCall | None = None,
    ) -> ProviderResult:
        try:
            if call is not None and call.handle is None:
                await call.accepted({"request_id": prediction.id, "urls": prediction.data.get("urls") or {}})
            await transport.wait(prediction, deadline=ctx.deadline, on_progress=call.progress if call else None)
            images = output_images(prediction)
        except BaseException as exc:
            if isinstance(exc, GatewayError):
                exc.accepted = True  # the prediction exists: it is never created again
            elif call is not None and call.detached:
                raise  # the worker is stopping: the next one resumes this prediction
            if not prediction.terminal:
                await best_effort(transport.cancel(prediction))
            raise
        seed = payload.get("seed")
        return ProviderResult(images=images, request_id=prediction.id, seed=seed if isinstance(seed, int) else None)

    def _cancel_once_created(self, transport: ReplicateTransport, create: asyncio.Future[Prediction]) -> None:
        """The caller left while the create (held open by `Prefer: wait`) was in flight: let it finish in
        the background, then cancel the prediction it made (Cancel-After bounds it regardless)."""

        async def cleanup() -> None:
            try:
                prediction = await create
            except BaseException:
                return  # nothing was created, or we cannot know its id
            if not prediction.terminal:
                await best_effort(transport.cancel(prediction))

        task = asyncio.ensure_future(cleanup())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def download(self, url: str) -> bytes:
        """Outputs (and redirects) on Replicate hosts get the token; others do not."""
        return await self.transport().download(url, max_bytes=self.max_output_bytes)
