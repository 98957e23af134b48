"""In-process job workers: claim a due job, run it through the ordinary service, record the outcome.

Each worker loops: claim (a lease in the store), run with `UpstreamHooks` in the context so the
adapter persists the upstream job's handle the moment the upstream accepts it (and resumes it
instead of submitting when the job was claimed again after a crash), renew the lease while it
runs (which is also how a cancel requested through another process arrives), then finish:

- success -> `succeeded` with the exact ImagesResponse and headers of the synchronous call;
- a retryable failure the upstream never accepted (5xx, timeouts, connection errors, 429) ->
  back to `queued` after an exponential backoff, until the job is `jobs.max_wait_seconds` old;
- anything else -> `failed` with OpenAI's error object;
- a cancel -> `canceled` (the adapter cancelled the upstream job on the way out).

`providers.<name>.max_concurrent_jobs` caps how many jobs of one provider (the model's first, or
pinned, route) this process runs at once: a worker does not claim jobs of a full lane.

Waiting for work: one worker of the process claims at a time. On a store whose claim blocks
(Redis: XREADGROUP on the lanes with room) that worker waits inside the store, and when a lane it
left out gets room again the runner ends the wait (`store.unblock`) so the claim is redone with
it; on the embedded store, idle workers wait for an in-process wake-up (a submit, a lane with
room) or `jobs.poll_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from imagegate.core.errors import GatewayError, InternalError, ProviderNotConfigured
from imagegate.jobs.model import STATUSES, Job
from imagegate.jobs.store import JobStore
from imagegate.jobs.webhooks import WebhookSender
from imagegate.observability.metrics import Metrics
from imagegate.providers.common import backoff_delay
from imagegate.providers.resume import UpstreamHooks
from imagegate.settings import JobsSettings

__all__ = ["Executor", "JobRunner", "Outcome", "is_requeueable"]

log = logging.getLogger("imagegate.jobs")

#: What running a job yields: the ImagesResponse body and the response headers.
Outcome = tuple[dict[str, Any], dict[str, str]]
Executor = Callable[[Job, UpstreamHooks], Awaitable[Outcome]]
_SWEEP_SECONDS = 30.0
_BLOCK_SECONDS = 5.0  # the longest one blocking claim waits (a new job or an unblock ends it sooner)


def is_requeueable(exc: GatewayError) -> bool:
    """May an async job wait and try again? Only when the upstream never took the job and the
    failure is of the passing kind (overload, outage, timeout, rate limit); never a client error
    or a missing provider key."""
    if exc.accepted or isinstance(exc, ProviderNotConfigured):
        return False
    return exc.retryable or exc.status in (429, 502, 503, 504)


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        execute: Executor,
        settings: JobsSettings,
        *,
        lane_limits: Mapping[str, int | None],
        webhooks: WebhookSender | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.execute = execute
        self.settings = settings
        self.lane_limits = dict(lane_limits)
        self.webhooks = webhooks
        self.metrics = metrics
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._wake = asyncio.Event()
        self._claiming = asyncio.Lock()
        self._lanes: Counter[str] = Counter()
        self._excluded: frozenset[str] = frozenset()  # the full lanes of the claim in flight
        self._running: dict[str, asyncio.Task[None]] = {}
        self._canceling: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # ---- lifecycle ----

    def start(self) -> None:
        for number in range(self.settings.workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"imagegate-job-worker-{number}"))
        if self.settings.workers:
            self._tasks.append(asyncio.create_task(self._housekeeping(), name="imagegate-job-housekeeping"))

    async def stop(self) -> None:
        """Stop claiming; running jobs are left to be resumed (their upstream jobs keep running)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.store.release(self.owner)

    def wake(self) -> None:
        """A job was submitted here (a blocking store's claim sees its ticket without help)."""
        if not self.store.claim_blocks:
            self._wake.set()

    def cancel_local(self, job_id: str) -> bool:
        """Cancel the job if a worker of this process runs it (the adapter cancels upstream)."""
        task = self._running.get(job_id)
        if task is None:
            return False
        self._canceling.add(job_id)
        task.cancel()
        return True

    async def wait_local(self, job_id: str, timeout: float) -> None:
        task = self._running.get(job_id)
        if task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), timeout)

    # ---- workers ----

    async def _claim(self) -> Job | None:
        async with self._claiming:
            self._wake.clear()
            limits = self.lane_limits.items()
            full = [lane for lane, limit in limits if limit is not None and self._lanes[lane] >= limit]
            self._excluded = frozenset(full)
            try:
                if self.store.claim_blocks:
                    job = await self._blocking_claim(full)
                else:
                    job = await self.store.claim(self.owner, lease=self.settings.lease_seconds, exclude_lanes=full)
            finally:
                self._excluded = frozenset()
            if job is not None and job.id in self._running:
                return None  # reclaimed from this very process (a stalled heartbeat): it still runs here
            if job is not None:
                self._lanes[job.lane] += 1
            return job

    async def _blocking_claim(self, full: list[str]) -> Job | None:
        claim = asyncio.ensure_future(
            self.store.claim(self.owner, lease=self.settings.lease_seconds, exclude_lanes=full, block=_BLOCK_SECONDS)
        )
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((claim, woken), return_when=asyncio.FIRST_COMPLETED)
            if not claim.done():  # a full lane has room: redo the claim with it
                await self.store.unblock(self.owner)
            return await claim
        finally:
            woken.cancel()
            if not claim.done():
                claim.cancel()
                await asyncio.gather(claim, return_exceptions=True)

    async def _worker(self) -> None:
        while not self._stopping:
            failed = False
            try:
                job = await self._claim()
            except Exception:
                log.exception("job store: claim failed")
                job, failed = None, True
            if job is None:
                if self.store.claim_blocks and not failed:
                    continue  # the store waited for work itself
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)
                continue
            task = asyncio.create_task(self._work(job))
            self._running[job.id] = task
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if self._stopping:  # shutting down: leave the upstream job running, for the next worker
                    await self._detach(task)
                    raise
            except Exception:  # the store failed while finishing: the lease runs out, the job is retried
                log.exception("job %s: the worker failed", job.id)
            finally:
                self._running.pop(job.id, None)
                self._canceling.discard(job.id)
                self._lanes[job.lane] -= 1
                if not self.store.claim_blocks or job.lane in self._excluded:
                    self._wake.set()  # a lane has room again

    async def _detach(self, task: asyncio.Task[None]) -> None:
        hooks = getattr(task, "imagegate_hooks", None)
        if isinstance(hooks, UpstreamHooks):
            hooks.detached = True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _work(self, job: Job) -> None:
        followable = [handle for handle in job.handles.values() if not handle.get("unresumable")]
        if job.cancel_requested and not followable:  # canceled while its dead worker held it: nothing upstream
            job.status = "canceled"
            await self.complete(job, self.owner)
            return
        log.info("job %s: in_progress (attempt %d, key %s, model %s)", job.id, job.attempts, job.key, job.model)
        if self.metrics is not None and job.attempts == 1:
            self.metrics.job_queue.observe(max(0.0, time.time() - job.created_at))

        async def persist(key: str, handle: dict[str, Any]) -> None:
            if not await self.store.save_handle(job.id, key, handle, handle.get("request_id"), owner=self.owner):
                # the job went to another worker while this submit was on its way: its handles stay
                # the ones that worker follows (other calls of this job may be among them: left running)
                log.warning("job %s: lost its lease while submitting; leaving it to the worker that took it", job.id)
                hooks.detached = True
                if task is not None:
                    task.cancel()
                raise asyncio.CancelledError
            log.info("job %s: upstream accepted (%s %s)", job.id, handle.get("provider"), handle.get("request_id"))

        async def progress(info: dict[str, Any]) -> None:
            try:
                await self.store.save_progress(job.id, info)
            except Exception:  # a report lost is no reason to fail the job
                log.warning("job %s: could not save the upstream's progress", job.id, exc_info=True)

        task = asyncio.current_task()

        async def guard() -> None:
            if await self.store.renew(job.id, self.owner, lease=self.settings.lease_seconds) is None:
                log.warning("job %s: lost its lease before submitting; leaving it to the worker that took it", job.id)
                hooks.detached = True
                if task is not None:
                    task.cancel()
                raise asyncio.CancelledError

        hooks = UpstreamHooks(handles=dict(job.handles), persist=persist, progress=progress, guard=guard)
        if task is not None:
            task.imagegate_hooks = hooks  # type: ignore[attr-defined]
        ended = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(job, task, hooks, ended))
        try:
            body, headers = await self.execute(job, hooks)
        except asyncio.CancelledError:
            if job.id not in self._canceling:
                raise  # shutdown: the lease runs out and another worker resumes the job
            if task is not None:
                task.uncancel()
            job.status, job.error = "canceled", None
        except GatewayError as exc:
            if is_requeueable(exc) and time.time() < job.created_at + self.settings.max_wait_seconds:
                delay = backoff_delay(
                    max(0, job.attempts - 1), base=self.settings.backoff_base, cap=self.settings.backoff_max,
                    retry_after=exc.retry_after,
                )
                requeued = await self.store.requeue(
                    job.id, self.owner, not_before=time.time() + delay, error=exc.envelope()["error"]
                )
                if requeued:
                    log.warning("job %s: %s (%s); queued again in %.1f s", job.id, exc.status, exc.code, delay)
                    self._wake.set()  # a blocked claim waits until the next backoff ends: this one may be sooner
                    return
            job.status, job.error = "failed", dict(exc.envelope()["error"])
            job.provider = exc.provider or job.provider
        except Exception:
            log.exception("job %s failed unexpectedly", job.id)
            job.status = "failed"
            job.error = dict(InternalError("The gateway failed while running this job.").envelope()["error"])
        else:
            job.status, job.result, job.headers, job.error = "succeeded", body, headers, None
            job.provider = headers.get("x-imagegate-provider", job.provider)
            job.upstream_request_id = headers.get("x-imagegate-upstream-request-id", job.upstream_request_id)
        finally:
            ended.set()  # stops the heartbeat even if a cancel were lost inside a store call
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.store.save_progress(job.id, None)  # the report was about this attempt
        fresh = await self.store.get(job.id)
        if fresh is not None:  # keep what the hooks recorded meanwhile
            job.upstream_request_id = job.upstream_request_id or fresh.upstream_request_id
            job.provider = job.provider or fresh.provider
        await self.complete(job, self.owner)

    async def complete(self, job: Job, owner: str | None) -> bool:
        """Write a terminal job, schedule its webhook, count it."""
        if self.webhooks is not None and job.webhook_url:
            job.webhook = self.webhooks.initial(job)
        finished = await self.store.finish(job, owner)
        if not finished:
            return False
        log.info("job %s: %s", job.id, job.status)
        if self.metrics is not None and job.started_at is not None and job.finished_at is not None:
            self.metrics.job_duration.observe(max(0.0, job.finished_at - job.started_at))
        if job.webhook is not None and not self.store.claim_blocks:
            self._wake.set()
        return True

    async def _heartbeat(
        self, job: Job, task: asyncio.Task[Any] | None, hooks: UpstreamHooks, ended: asyncio.Event
    ) -> None:
        interval = min(1.0, self.settings.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            if ended.is_set():
                return
            try:
                cancel = await self.store.renew(job.id, self.owner, lease=self.settings.lease_seconds)
            except Exception:
                log.warning("job %s: could not renew the lease", job.id, exc_info=True)
                continue
            if cancel is None and task is not None:  # the lease ran out and another worker took the job
                log.warning("job %s: lost its lease; leaving it to the worker that took it", job.id)
                hooks.detached = True  # that worker follows the same upstream job
                task.cancel()
                return
            if cancel and task is not None and job.id not in self._canceling:
                self._canceling.add(job.id)
                task.cancel()

    # ---- housekeeping: retention, webhooks, gauges ----

    async def _housekeeping(self) -> None:
        last_sweep = 0.0
        while not self._stopping:
            try:
                if self.webhooks is not None:
                    await self.webhooks.deliver_due(self.store)
                now = time.time()
                if now - last_sweep >= _SWEEP_SECONDS:
                    last_sweep = now
                    purged = await self.store.purge(now - self.settings.retention_seconds)
                    if purged:
                        log.info("jobs: %d finished job(s) past retention removed", purged)
                if self.metrics is not None:
                    counts = await self.store.counts()
                    for status in STATUSES:
                        self.metrics.jobs.labels(status=status).set(counts.get(status, 0))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("jobs: housekeeping failed")
            await asyncio.sleep(min(self.settings.poll_seconds, 0.5))
