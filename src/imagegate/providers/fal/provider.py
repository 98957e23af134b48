"""`FalProvider`: fal's tables (tables.py) and protocol (transport.py) behind the adapter interface.

Route options (all optional):
    mode              "queue" (default: settings.providers.fal.mode) or "sync" (POST fal.run)
    inline_max_bytes  inputs up to this many bytes go as data URIs, larger ones are uploaded to
                      fal storage (default: settings.providers.fal.inline_max_bytes)
    sync_mode         true: ask fal for data-URI outputs (default: settings...sync_mode_b64)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import httpx

from imagegate.core.errors import GatewayError, InternalError, InvalidRequest, ProviderNotConfigured
from imagegate.core.params import ParamTable
from imagegate.core.request import InputImage, Operation
from imagegate.core.sizes import SizePresets
from imagegate.providers.base import CallContext, Provider, ProviderResult, Route
from imagegate.providers.fal.status import FalOutput, QueueHandle, StatusCadence
from imagegate.providers.fal.tables import TABLES, parse_output, size_presets
from imagegate.providers.fal.transport import NOT_CONFIGURED, FalTransport
from imagegate.providers.resume import unresumable_call

__all__ = ["MAX_DATA_URI_CHARS", "FalProvider"]

log = logging.getLogger("imagegate.providers.fal")

# fal's toolkit caps a data URI at 10 MiB (fal-protocol.md §6); whether the qwen endpoints enforce
# it, and what their body limit is, is not documented. So no data URI may exceed it, and the data
# URIs of one request share that budget too: whatever does not fit is uploaded.
MAX_DATA_URI_CHARS = 10 * 1024 * 1024


class FalProvider(Provider):
    """fal.ai over plain httpx: queue (default) or sync run, uploads for large inputs."""

    name = "fal"

    def __init__(self, http: httpx.AsyncClient, settings: Any) -> None:
        super().__init__(http, settings)
        self.config = settings.providers.fal
        self.transport = FalTransport(http, self.config)

    def check_configured(self) -> None:
        if self.transport.auth() is None:
            raise ProviderNotConfigured(NOT_CONFIGURED)

    def models(self) -> Sequence[str]:
        return sorted({model for model, _ in TABLES})

    def table(self, model: str, operation: Operation) -> ParamTable:
        return TABLES[(model, operation)]

    def size_presets(self, model: str) -> SizePresets | None:
        try:
            return size_presets(model)
        except KeyError:
            return None

    async def prepare_images(
        self, images: Sequence[InputImage], route: Route, *, dry_run: bool = False
    ) -> list[str]:
        """http(s) URLs pass through; bytes become a data URI when small enough (`inline_max_bytes`,
        and within the data-URI budget), else are uploaded to fal storage, several at once. With
        `dry_run`, uploads are shown as `<upload: image/png, 1234567 bytes>`."""
        limit = int(route.options.get("inline_max_bytes", self.config.inline_max_bytes))
        budget = MAX_DATA_URI_CHARS
        refs: list[str] = []
        pending: list[tuple[int, InputImage]] = []
        for index, image in enumerate(images):
            if image.data is None:
                if image.url is None:
                    raise InvalidRequest("An input image has neither bytes nor a URL.", param="image")
                refs.append(image.url)
                continue
            length = _data_uri_chars(image)
            if len(image.data) <= limit and length <= budget:
                budget -= length
                refs.append(image.data_uri())
            elif dry_run:
                refs.append(f"<upload: {image.mime}, {len(image.data)} bytes>")
            else:
                refs.append("")  # filled in by the upload below
                pending.append((index, image))
        if pending:
            self.check_configured()
            timeout = route.timeout or self.settings.routing.deadline_seconds
            tasks = [asyncio.ensure_future(self._upload(image, index, timeout)) for index, image in pending]
            try:
                urls = await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
            for (index, _), url in zip(pending, urls, strict=True):
                refs[index] = url
        return refs

    async def _upload(self, image: InputImage, index: int, timeout: float) -> str:
        assert image.data is not None
        name = f"input-{index}.{image.format or 'bin'}"
        return await self.transport.upload(image.data, content_type=image.mime, file_name=name, timeout=timeout)

    async def run(self, payload: dict[str, Any], route: Route, ctx: CallContext) -> ProviderResult:
        """One upstream call (queue or sync per route). On cancellation the queued job is cancelled
        best-effort (transport.run_queued) before the CancelledError propagates."""
        self.check_configured()
        if route.options.get("sync_mode", self.config.sync_mode_b64) and "sync_mode" not in payload:
            payload = {**payload, "sync_mode": True}  # outputs come back as data URIs (decoded in the pool)
        mode = route.options.get("mode", self.config.mode)
        output: FalOutput
        if mode == "queue":
            output = await self._queued(payload, route, ctx)
        elif mode == "sync" and ctx.hooks is None:  # nothing to guard outside an async job
            output = await self.transport.run_sync(route.model, payload, deadline=ctx.deadline)
        elif mode == "sync":
            async with unresumable_call(ctx.hooks, self.name, route.model, payload):
                output = await self.transport.run_sync(route.model, payload, deadline=ctx.deadline)
        else:
            raise InternalError(f"fal route option `mode` must be 'queue' or 'sync', not {mode!r}.")
        log.debug("fal %s finished: request_id=%s gateway_request=%s", route.model, output.request_id, ctx.request_id)
        try:
            images, seed = parse_output(output.body, safety_checker=payload.get("enable_safety_checker") is not False)
        except GatewayError as exc:
            exc.accepted = True  # the job ran: its output is what failed
            raise
        return ProviderResult(images=images, request_id=output.request_id, seed=seed)

    async def _queued(self, payload: dict[str, Any], route: Route, ctx: CallContext) -> FalOutput:
        """A queue call; for an async job (`ctx.hooks`) the handle is persisted on acceptance, and a
        job already accepted in an earlier run is followed again instead of being submitted."""
        hooks = ctx.hooks
        if hooks is None:
            return await self.transport.run_queued(route.model, payload, deadline=ctx.deadline)
        async with hooks.call(self.name, route.model, payload) as call:

            async def accepted(handle: QueueHandle) -> None:
                await call.accepted(dataclasses.asdict(handle))

            def detached() -> bool:
                return call.detached

            # A job holds its worker's (and provider's) slot until fal's answer is seen: a short
            # first poll interval (or the SSE stream, whose connections the workers bound) keeps
            # the slot from idling past a quick job.
            cadence = StatusCadence(
                stream=self.config.status_stream or self.config.job_status_stream,
                poll_interval=min(self.config.poll_interval, self.config.job_poll_interval),
            )

            if call.handle is not None:
                handle = QueueHandle(**{f.name: str(call.handle[f.name]) for f in dataclasses.fields(QueueHandle)})
                log.info("fal resuming %s request_id=%s", route.model, handle.request_id)
                return await self.transport.follow(
                    handle, deadline=ctx.deadline, detached=detached, on_progress=call.progress, cadence=cadence
                )
            return await self.transport.run_queued(
                route.model, payload, deadline=ctx.deadline, on_accepted=accepted, detached=detached,
                on_progress=call.progress, cadence=cadence,
            )


def _data_uri_chars(image: InputImage) -> int:
    """Length of `image.data_uri()` without building it."""
    assert image.data is not None
    return len(f"data:{image.mime};base64,") + 4 * -(-len(image.data) // 3)
