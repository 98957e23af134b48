"""The app factory: `create_app(settings)` builds everything eagerly, so a bad catalog or an
unknown provider fails here, not at the first request; the lifespan only releases resources."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from imagegate import __version__, usage
from imagegate.access import Access
from imagegate.api import errors, files, health, images, jobs, metrics, models, openapi, playground
from imagegate.api.admission import AdmissionMiddleware, Budget
from imagegate.api.hot_routes import Gateway
from imagegate.auth import AuthMiddleware
from imagegate.core import redact
from imagegate.core.catalog import Catalog
from imagegate.core.fetch import GuardedFetcher
from imagegate.core.imaging import ImagePool
from imagegate.core.service import ImageService
from imagegate.jobs import build_jobs
from imagegate.observability.logs import configure_logging
from imagegate.observability.metrics import Metrics
from imagegate.observability.middleware import InFlight, ObservabilityMiddleware
from imagegate.providers.fal.stream import stream_slots
from imagegate.providers.registry import build_providers
from imagegate.runtime import tune_gc
from imagegate.settings import Settings, load_settings
from imagegate.state.redis import connect as connect_redis
from imagegate.storage.factory import build_storage
from imagegate.upstream_http import upstream_client

__all__ = ["app_from_env", "create_app"]

log = logging.getLogger("imagegate")
_CANCEL_WAIT_SECONDS = 10.0  # for upstream cancellations (fal's cancel call is bounded by 5 s)


def _http_client(streams: int = 0) -> httpx.AsyncClient:
    """One pooled client for every upstream call. Per-call timeouts are set by the adapters.

    Its transport (`upstream_http`: the gateway's own HTTP/1.1 pool behind httpx's API) costs the
    same per request however many are in flight; at most 1000 connections per upstream host, more requests
    wait in a FIFO queue. Idle connections are dropped before common server idle timeouts (uvicorn
    5 s) can race a reuse. `streams` more per host for fal's status streams (one held per job)."""
    return upstream_client(
        timeout=httpx.Timeout(60.0, connect=10.0),
        limits=httpx.Limits(max_connections=1000 + streams, max_keepalive_connections=1000, keepalive_expiry=4),
        headers={"user-agent": f"imagegate/{__version__}"},
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    redact.remember_secrets(settings)  # masked in every message and log line (core/redact.py)
    http = _http_client(stream_slots(settings.providers.fal))
    pool = ImagePool(settings.image_workers)
    storage = build_storage(settings.storage)
    catalog = Catalog.from_config(settings.models)
    fetcher = GuardedFetcher(http, settings.fetch)
    service = ImageService(
        settings=settings,
        catalog=catalog,
        providers=build_providers(http, settings, pool),
        storage=storage,
        pool=pool,
        fetcher=fetcher,
    )
    redis = connect_redis(settings.redis)  # None: limits, idempotency and usage stay in memory
    access = Access.build(settings, storage=storage, redis=redis)

    telemetry = Metrics()
    inflight = InFlight()
    job_service = build_jobs(
        settings, http=http, service=service, catalog=catalog, access=access, guard=fetcher, metrics=telemetry,
        redis=redis,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        job_service.runner.start()  # in-process job workers (jobs.workers; 0: none)
        tune_gc()
        try:
            yield
        finally:
            await job_service.runner.stop()  # running jobs stay leased; their upstream jobs are resumed later
            # The server has stopped accepting and waited `shutdown_grace_seconds`; requests it then
            # cancelled are cancelling their upstream jobs: let them finish before the client closes.
            await inflight.drain(_CANCEL_WAIT_SECONDS)
            telemetry.close()
            await http.aclose()
            await storage.close()
            if redis is not None:
                await redis.aclose()
            await job_service.store.close()
            pool.close()

    # FastAPI, with POST on the two image routes served by a lean stack of the same middleware (api/hot_routes.py)
    app = Gateway(title="imagegate", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.http = http
    app.state.pool = pool
    app.state.storage = storage
    app.state.catalog = catalog
    app.state.fetcher = fetcher
    app.state.service = service
    app.state.redis = redis
    app.state.access = access
    app.state.metrics = telemetry
    app.state.inflight = inflight
    app.state.jobs = job_service
    app.state.budget = Budget.from_limits(settings.limits)
    app.add_middleware(AdmissionMiddleware, budget=app.state.budget)  # inside auth: a refused key costs no budget
    app.add_middleware(AuthMiddleware, keyring=access.keyring)  # inside the request-id middleware
    errors.install(app)
    for router in (images.router, models.router, files.router, health.router, usage.router, metrics.router):
        app.include_router(router)
    app.include_router(jobs.router)
    if settings.playground:
        app.include_router(playground.router)
    openapi.install(app)  # the document at /openapi.json describes the wire, not FastAPI's guess
    # Added last, so it is the outermost middleware: it sees every response, errors included.
    app.add_middleware(
        ObservabilityMiddleware, metrics=telemetry, inflight=inflight, log_prompts=settings.logging.log_prompts
    )
    redact.install_log_filter()  # last: every module (storage backends included) has made its logger
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` and multi-worker serving: config from `$IMAGEGATE_CONFIG`."""
    settings = load_settings()
    configure_logging(settings)
    return create_app(settings)
