"""Async image jobs: submit now, collect later (README "Async image jobs").

    model.py     the Job record, its public JSON, the request codec
    store.py     JobStore and the embedded engine (SQLite, WAL, leases)
    redis_store.py  the distributed engine (Redis Streams consumer groups + Lua scripts in redis_lua.py)
    runner.py    in-process workers: claim, run, requeue with backoff, finish
    webhooks.py  signed webhook delivery (Standard Webhooks), at least once
    service.py   JobService: submit / get / list / cancel / events, and the workers' executor
"""

from __future__ import annotations

import httpx
from redis.asyncio import Redis

from imagegate.access import Access, RunService
from imagegate.core.catalog import Catalog
from imagegate.core.fetch import GuardedFetcher
from imagegate.jobs.redis_store import RedisJobStore
from imagegate.jobs.runner import Executor, JobRunner
from imagegate.jobs.service import JobService
from imagegate.jobs.store import JobStore, SqliteJobStore
from imagegate.jobs.webhooks import WebhookSender
from imagegate.observability.metrics import Metrics
from imagegate.settings import Settings

__all__ = ["JobService", "build_jobs"]


def build_jobs(
    settings: Settings,
    *,
    http: httpx.AsyncClient,
    service: RunService,
    catalog: Catalog,
    access: Access | None,
    guard: GuardedFetcher,
    metrics: Metrics | None,
    redis: Redis | None = None,
) -> JobService:
    """The job service: on Redis when the app has a Redis client (`redis.url`), else on the
    embedded SQLite store. A key with a default `webhook_url` and no
    `webhooks.secret` fails here, at start."""
    if settings.webhooks.secret is None:
        for key in settings.auth.keys:
            if key.webhook_url:
                raise ValueError(f"auth key {key.name!r} has a webhook_url but webhooks.secret is not set")
    lanes = {
        name: getattr(getattr(settings.providers, name), "max_concurrent_jobs", None)
        for name in type(settings.providers).model_fields
    }
    store: JobStore
    if redis is not None:
        store = RedisJobStore(redis, settings.redis.key_prefix, lanes=list(lanes))
    else:
        store = SqliteJobStore(settings.jobs.path or settings.storage.path.parent / "jobs.db")
    webhooks = WebhookSender(http, settings.webhooks, guard, metrics)

    def runner(execute: Executor) -> JobRunner:
        return JobRunner(store, execute, settings.jobs, lane_limits=lanes, webhooks=webhooks, metrics=metrics)

    return JobService(store, service=service, catalog=catalog, access=access, webhooks=webhooks, runner_factory=runner)
