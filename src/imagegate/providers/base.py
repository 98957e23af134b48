"""The adapter interface every provider implements.

An adapter is thin: a parameter table per upstream model (pure data, applied by
`core.plan.apply_table`), `prepare_images` to turn input images into references the
provider accepts (data URIs, uploads, or URLs passed through), `run` for the protocol
itself (submit, poll, fetch result, cancel on cancellation), and `fetch` to download an
output (streamed, capped at `settings.fetch.max_bytes`). Upstream failures are raised as
`core.errors.GatewayError` subclasses.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from imagegate.core.errors import UpstreamError
from imagegate.core.params import ParamTable
from imagegate.core.request import InputImage, Operation
from imagegate.core.sizes import SizePresets
from imagegate.providers.common import decode_data_uri, download
from imagegate.providers.resume import UpstreamHooks, current_hooks

__all__ = [
    "CallContext",
    "Provider",
    "ProviderImage",
    "ProviderResult",
    "Route",
]


@dataclass(frozen=True, slots=True)
class Route:
    """One way to serve a public model: a provider, its model id, and per-route options."""

    provider: str
    model: str  # the upstream model id, e.g. "fal-ai/qwen-image-edit-2511"
    options: Mapping[str, Any] = field(default_factory=dict)
    timeout: float | None = None  # per-route deadline in seconds (overrides the global one)


@dataclass(slots=True)
class CallContext:
    """Per-call facts an adapter may need."""

    request_id: str  # the gateway's x-request-id, for upstream logs
    deadline: float  # absolute `time.monotonic()` by which the call must finish
    operation: Operation
    # An async job's hooks (providers/resume.py): record the accepted upstream job, resume it after a restart.
    hooks: UpstreamHooks | None = field(default_factory=current_hooks)


@dataclass(slots=True)
class ProviderImage:
    """One output image: bytes already in hand, or a URL: http(s) to download, or a `data:` URL
    as the provider returned it (decoded off the event loop, at delivery). Width, height and
    content type are what the provider reported (None when it did not say)."""

    data: bytes | None = None
    url: str | None = None
    content_type: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass(slots=True)
class ProviderResult:
    images: list[ProviderImage]
    request_id: str | None = None  # the upstream's id for the job, reported to the client
    seed: int | None = None
    revised_prompt: str | None = None


class Provider(abc.ABC):
    """A provider adapter. One instance per gateway, sharing the app's `httpx.AsyncClient`."""

    name: ClassVar[str]
    # False for providers that need the bytes (the gateway then fetches URL inputs through its guard).
    accepts_image_urls: ClassVar[bool] = True

    def __init__(self, http: httpx.AsyncClient, settings: Any) -> None:
        self.http = http
        self.settings = settings

    @abc.abstractmethod
    def check_configured(self) -> None:
        """Raise ProviderNotConfigured (naming the missing setting) if this provider cannot run."""

    @abc.abstractmethod
    def models(self) -> Sequence[str]:
        """The upstream model ids this adapter has tables for."""

    @abc.abstractmethod
    def table(self, model: str, operation: Operation) -> ParamTable:
        """The parameter table for `model` and `operation`; KeyError if there is none."""

    def size_presets(self, model: str) -> SizePresets | None:
        """The model's native size grid (None: use the catalog's default presets)."""
        return None

    @abc.abstractmethod
    async def prepare_images(
        self, images: Sequence[InputImage], route: Route, *, dry_run: bool = False
    ) -> list[str]:
        """Provider-ready references for `images` (data URIs, uploaded file URLs, or the caller's
        URLs). With `dry_run`, nothing is uploaded: uploads are shown as placeholders."""

    @abc.abstractmethod
    async def run(self, payload: dict[str, Any], route: Route, ctx: CallContext) -> ProviderResult:
        """Run one upstream call. On cancellation (client gone, deadline), cancel the upstream job
        best-effort, then re-raise."""

    @property
    def max_output_bytes(self) -> int:
        """The cap on one downloaded (or data-URI) output: `settings.fetch.max_bytes`."""
        return int(self.settings.fetch.max_bytes)

    def check_data_uri_size(self, uri: str) -> None:
        """UpstreamError if a `data:` output decodes to more than `max_output_bytes` (read from its
        length alone, before anything is decoded)."""
        payload_chars = len(uri) - uri.find(",") - 1
        if payload_chars // 4 * 3 - 2 > self.max_output_bytes:  # base64 padding: at least this many bytes
            raise UpstreamError(f"The {self.name} output was larger than the limit of {self.max_output_bytes} bytes.")

    async def fetch(self, image: ProviderImage) -> bytes:
        """The bytes of an output: in hand, a `data:` URL (decoded in a worker thread), or a
        download (`download`). Larger than `max_output_bytes` -> UpstreamError."""
        if image.data is not None:
            return image.data
        if image.url is None:
            raise ValueError("provider image has neither bytes nor url")
        if image.url[:5].lower() == "data:":
            self.check_data_uri_size(image.url)
            data, _ = await asyncio.to_thread(decode_data_uri, image.url)
            return data
        return await self.download(image.url)

    async def download(self, url: str) -> bytes:
        """GET an http(s) output, following redirects, streamed and capped (no credentials sent)."""
        return await download(self.http, url, provider=self.name, max_bytes=self.max_output_bytes)
