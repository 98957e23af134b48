"""What `imagegate serve --workers N` (N > 1) needs to keep every guarantee across processes.

Each worker is its own process: without `redis.url`, per-key limits, idempotency records and usage
totals live in one worker's memory. Metrics are shared through `$PROMETHEUS_MULTIPROC_DIR`
(`observability.metrics.prepare_multiprocess_dir`).

    check_workers(settings, workers) -> (errors, warnings)

An error (the CLI refuses to start): client keys with limits (`rpm`, `images_per_minute`,
`max_concurrent`) and no Redis — each worker would count alone, multiplying every limit by N.
A warning: no Redis, so an `Idempotency-Key` repeat that lands on another worker runs again, and
`/v1/usage` shows one worker's totals.
"""

from __future__ import annotations

from imagegate.settings import Settings

__all__ = ["check_workers"]

_LIMITS = ("rpm", "images_per_minute", "max_concurrent")


def check_workers(settings: Settings, workers: int) -> tuple[list[str], list[str]]:
    if workers <= 1 or settings.redis.url:
        return [], []
    limited = [key.name for key in settings.auth.keys if any(getattr(key, field) for field in _LIMITS)]
    errors = []
    if limited:
        errors.append(
            f"--workers {workers} without redis.url: the limits of client keys {', '.join(limited)} would be "
            f"counted by each worker alone (every limit times {workers}); set redis.url, or run one worker"
        )
    warnings = [
        f"{workers} workers without redis.url: Idempotency-Key records and /v1/usage totals are kept per "
        "worker (a repeat that reaches another worker runs again); set redis.url to share them"
    ]
    return errors, warnings
