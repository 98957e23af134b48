"""Prometheus metrics (`GET /metrics`), through prometheus-client.

One `Metrics` per app, each with its own registry (several apps in one process never mix).
With several worker processes, values live in files under `$PROMETHEUS_MULTIPROC_DIR` and
`/metrics`, whichever worker answers, aggregates every worker's files: `imagegate serve
--workers N` prepares that directory (`prepare_multiprocess_dir`) before the workers start. The
variable must be set before `prometheus_client` is imported, which is why the CLI, not the app,
sets it.

Labels are bounded: `endpoint` is the route template (`other` for unknown paths), `model` a
catalog id (or `-`), `key` a configured key name (or `anonymous`), `provider` a provider name,
`outcome` `success`/`cancelled`/an error code, `op` a post-processing step, `param`/`mode` a
parameter of the tables and what the gateway did with it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "Metrics", "multiprocess_dir", "prepare_multiprocess_dir"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_POSTPROCESS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def prepare_multiprocess_dir(workers: int) -> Path | None:
    """Before starting the server: use `$PROMETHEUS_MULTIPROC_DIR` if set (emptied of stale `*.db`
    files from an earlier run), else for `workers` > 1 create a temporary directory (removed at exit)
    and export it. Returns the directory, or None (one process, its own registry)."""
    path = multiprocess_dir()
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
        return path
    if workers <= 1:
        return None
    path = Path(tempfile.mkdtemp(prefix="imagegate-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    atexit.register(shutil.rmtree, path, True)
    return path


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        registry = self.registry = CollectorRegistry(auto_describe=True)

        self.requests = Counter(
            "imagegate_requests", "HTTP requests answered.", ["endpoint", "model", "status", "key"], registry=registry
        )
        self.request_duration = Histogram(
            "imagegate_request_duration_seconds",
            "Time from the request's arrival to its last response byte.",
            ["endpoint", "model"],
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "imagegate_in_flight_requests",
            "HTTP requests being served.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.upstream_requests = Counter(
            "imagegate_upstream_requests",
            "Calls to a provider, by outcome.",
            ["provider", "outcome"],
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "imagegate_upstream_duration_seconds",
            "Duration of one provider call (polling included).",
            ["provider"],
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.retries = Counter("imagegate_retries", "Provider calls retried.", ["provider"], registry=registry)
        self.fallbacks = Counter(
            "imagegate_fallbacks", "Requests moved on to the model's next route.", ["model"], registry=registry
        )
        self.emulations = Counter(
            "imagegate_emulations",
            "Parameters the gateway handled other than by passing them through (x-imagegate-params).",
            ["param", "mode"],
            registry=registry,
        )
        self.images = Counter("imagegate_images", "Images delivered.", ["model", "provider"], registry=registry)
        self.cost = Counter(
            "imagegate_cost_usd", "Estimated upstream cost (x-imagegate-cost-usd).", ["key", "model"], registry=registry
        )
        self.postprocess = Histogram(
            "imagegate_postprocess_seconds",
            "Gateway image work per step (transform, base64, store).",
            ["op"],
            buckets=_POSTPROCESS_BUCKETS,
            registry=registry,
        )

        self.jobs = Gauge(
            "imagegate_jobs", "Async image jobs in the job store, by status.", ["status"],
            registry=registry, multiprocess_mode="mostrecent",
        )
        self.job_queue = Histogram(
            "imagegate_job_queue_seconds", "Time an async job waited before a worker first took it.",
            buckets=_REQUEST_BUCKETS, registry=registry,
        )
        self.job_duration = Histogram(
            "imagegate_job_duration_seconds", "Time from a job's first start to its end.",
            buckets=_REQUEST_BUCKETS, registry=registry,
        )
        self.webhook_deliveries = Counter(
            "imagegate_webhook_deliveries", "Webhook delivery attempts, by outcome.", ["outcome"], registry=registry
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set (per request this is hot: several
        metrics; the label sets are bounded, see the module docstring)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        """The text exposition: this app's registry, or every worker's files in multiprocess mode."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def close(self) -> None:
        """At worker exit: drop this process's live gauges from the aggregate."""
        if self.multiprocess:
            with contextlib.suppress(Exception):
                multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
