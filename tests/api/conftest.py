"""A minimal app with the state the real `create_app` sets, around a fake ImageService."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI
from PIL import Image

from imagegate.api import errors, files, health, images, models
from imagegate.core.catalog import Catalog
from imagegate.core.fetch import GuardedFetcher
from imagegate.core.imaging import ImagePool
from imagegate.core.request import ImageRequest
from imagegate.core.results import DryRunResult, ImageResult, OutputImage
from imagegate.settings import (
    FetchSettings,
    LimitsSettings,
    ModelConfig,
    RouteConfig,
    RoutingSettings,
    Settings,
    StorageSettings,
)
from imagegate.storage.local import LocalStorage

MAX_PIXELS = 1_000_000
OUTPUT_PNG = b"\x89PNG fake output"


def encode(fmt: str, w: int = 32, h: int = 24, *, noisy: bool = False, mode: str = "RGB") -> bytes:
    """A real image; `noisy` makes the pixel data big enough that truncating it breaks decoding."""
    if noisy:
        img = Image.frombytes("RGB", (w, h), bytes((i * 7919) % 251 for i in range(w * h * 3)))
    else:
        img = Image.new(mode, (w, h), (200, 40, 40) if mode == "RGB" else (200, 40, 40, 128))
    out = io.BytesIO()
    img.save(out, format=fmt.upper())
    return out.getvalue()


@dataclass
class Call:
    request: ImageRequest
    request_id: str
    base_url: str
    dry_run: bool


@dataclass
class FakeService:
    """Records every ImageRequest; returns a canned ImageResult (or raises `error`)."""

    delay: float = 0.0
    error: BaseException | None = None
    headers: dict[str, str] = field(default_factory=lambda: {"x-imagegate-provider": "fake"})
    calls: list[Call] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False

    @property
    def last(self) -> ImageRequest:
        return self.calls[-1].request

    async def run(
        self,
        request: ImageRequest,
        *,
        request_id: str,
        base_url: str,
        dry_run: bool = False,
        on_plan: Callable[[Mapping[str, str]], None] | None = None,
    ) -> ImageResult | DryRunResult:
        self.calls.append(Call(request, request_id, base_url, dry_run))
        if on_plan is not None:
            on_plan({"x-imagegate-provider": "fake"})
        self.started.set()
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        if dry_run:
            return DryRunResult(
                model=request.model,
                provider="fake",
                upstream_model="fake/model",
                payloads=[{"prompt": request.prompt}],
                params={"n": "passthrough"},
                notes={},
                target_size=request.size,
                headers=dict(self.headers),
            )
        b64 = base64.b64encode(OUTPUT_PNG).decode()
        return ImageResult(
            created=1_700_000_000,
            data=[OutputImage(b64_json=b64) for _ in range(request.n)],
            size="32x24",
            output_format="png",
            quality="high",
            background="opaque",
            headers=dict(self.headers),
        )


def make_settings(tmp_path: Path, **limits: Any) -> Settings:
    return Settings(
        limits=LimitsSettings(max_pixels=MAX_PIXELS, **limits),
        storage=StorageSettings(path=tmp_path / "images"),
        routing=RoutingSettings(keepalive_seconds=0.02),
        fetch=FetchSettings(),
        models={
            "sandbox-edit": ModelConfig(routes=[RouteConfig(provider="sandbox", model="sandbox-edit")]),
            "sandbox-image": ModelConfig(routes=[RouteConfig(provider="sandbox", model="sandbox-image")]),
        },
    )


def make_app(settings: Settings, service: Any, storage: Any, pool: ImagePool, http: httpx.AsyncClient) -> FastAPI:
    app = FastAPI()
    errors.install(app)
    for module in (images, models, files, health):
        app.include_router(module.router)
    app.state.settings = settings
    app.state.service = service
    app.state.catalog = Catalog.from_config(settings.models)
    app.state.storage = storage
    app.state.pool = pool
    app.state.http = http
    app.state.fetcher = GuardedFetcher(http, settings.fetch)
    return app


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def pool() -> AsyncIterator[ImagePool]:
    p = ImagePool(2)
    yield p
    p.close()


@pytest.fixture
async def app(settings: Settings, service: FakeService, pool: ImagePool) -> AsyncIterator[FastAPI]:
    storage = LocalStorage(settings.storage.path)
    async with httpx.AsyncClient() as http:
        yield make_app(settings, service, storage, pool, http)
    await storage.close()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


@pytest.fixture
async def sdk(app: FastAPI) -> AsyncIterator[openai.AsyncOpenAI]:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
    async with openai.AsyncOpenAI(api_key="x", base_url="http://test/v1", http_client=http, max_retries=0) as c:
        yield c
