"""`imagegate worker`: job workers without the HTTP server.

The process builds the same app as `imagegate serve` (so the service, keys, limits, storage and
job store are wired identically) and runs its lifespan, which starts the job workers, until
SIGTERM or SIGINT; then the workers stop as in a graceful shutdown (running jobs are left to be
resumed, their upstream jobs untouched). Run it next to API processes with `jobs.workers: 0`: with
`redis.url` set they share the queue through Redis, from any host; without it, through the SQLite
database on the same data directory (one host).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from imagegate.app import create_app
from imagegate.observability.logs import configure_logging
from imagegate.settings import Settings

__all__ = ["run_worker"]

log = logging.getLogger("imagegate.jobs")


async def _serve_jobs(settings: Settings) -> None:
    app = create_app(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with app.router.lifespan_context(app):
        log.info("imagegate worker: %d job worker(s) running", settings.jobs.workers)
        await stop.wait()
        log.info("imagegate worker: stopping")


def run_worker(settings: Settings, *, concurrency: int | None = None) -> int:
    """Run `concurrency` job workers (default `jobs.workers`, at least 1) until SIGTERM/SIGINT."""
    workers = concurrency if concurrency is not None else settings.jobs.workers or 4
    settings = settings.model_copy(update={"jobs": settings.jobs.model_copy(update={"workers": max(1, workers)})})
    configure_logging(settings)
    asyncio.run(_serve_jobs(settings))
    return 0
