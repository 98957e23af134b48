"""`JobService`: what the job endpoints call (`app.state.jobs`), and the executor the workers run.

Submitting validates the request as the synchronous call would (the key's allow-list, the route
pin, and the parameter table of the route the call would be served on, the first whose provider is
configured, through a dry run: nothing is uploaded or called; with no provider configured, the
call's 503), stores the job and its request before the 202 is sent, and wakes a worker. Running a
job calls the same client service as a synchronous request (limits, usage and cost count for the
key), with the upstream hooks set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from imagegate.access import Access, ClientService, RunService
from imagegate.auth.keys import ClientKey
from imagegate.core.catalog import Catalog
from imagegate.core.errors import InternalError, InvalidRequest, NotFound
from imagegate.core.request import ImageRequest
from imagegate.core.results import DryRunResult
from imagegate.idempotency import IdempotencyKeyReused, fingerprint
from imagegate.idempotency.guard import check_key
from imagegate.jobs.model import STATUSES, Job, decode_request, encode_request, new_job_id
from imagegate.jobs.runner import JobRunner, Outcome
from imagegate.jobs.store import JobStore
from imagegate.jobs.webhooks import PARAM as WEBHOOK_PARAM
from imagegate.jobs.webhooks import WebhookSender
from imagegate.providers.resume import UpstreamHooks, active_hooks

__all__ = ["JobService"]

log = logging.getLogger("imagegate.jobs")
_CANCEL_WAIT_SECONDS = 10.0
_EVENT_POLL_SECONDS = 0.25


class JobService:
    def __init__(
        self,
        store: JobStore,
        *,
        service: RunService,
        catalog: Catalog,
        access: Access | None,
        webhooks: WebhookSender,
        runner_factory: Any,
    ) -> None:
        self.store = store
        self.service = service
        self.catalog = catalog
        self.access = access
        self.webhooks = webhooks
        self.runner: JobRunner = runner_factory(self.execute)

    # ---- submit ----

    async def submit(
        self,
        request: ImageRequest,
        *,
        client: ClientKey | None,
        key: str,
        base_url: str,
        validator: RunService,
        idempotency_key: str | None = None,
    ) -> tuple[Job, bool]:
        """The queued job, and whether it already existed (the same Idempotency-Key and request)."""
        webhook_url = request.extra.pop(WEBHOOK_PARAM, None)
        if webhook_url is not None and not isinstance(webhook_url, str):
            raise InvalidRequest("`webhook_url` must be a string (an http or https URL).", param=WEBHOOK_PARAM)
        webhook_url = webhook_url or (client.webhook_url if client is not None else None)
        if webhook_url:
            await self.webhooks.check_url(webhook_url)
        request.stream = False
        checked = await validator.run(request, request_id="validate", base_url=base_url, dry_run=True)
        if not isinstance(checked, DryRunResult):  # pragma: no cover - a dry run returns nothing else
            raise InternalError("The request could not be validated.")
        if checked.unavailable is not None:  # no provider of the model is configured: the sync call's answer
            raise checked.unavailable
        job = Job(
            id=new_job_id(),
            key=key,
            model=checked.model,
            operation=request.operation,
            lane=checked.provider,  # the route the request is validated on: the first configured one
            base_url=base_url,
            created_at=time.time(),
            webhook_url=webhook_url or None,
            idempotency_key=check_key(idempotency_key) if idempotency_key is not None else None,
        )
        if job.idempotency_key is not None:
            job.fingerprint = await asyncio.to_thread(fingerprint, request)
        stored = await self.store.add(job, await asyncio.to_thread(encode_request, request))  # base64 of the images
        if stored.id != job.id:
            if stored.fingerprint != job.fingerprint:
                raise IdempotencyKeyReused(
                    "This Idempotency-Key was already used for a different request.", param="Idempotency-Key"
                )
            return stored, True
        log.info("job %s: queued (key %s, model %s)", job.id, key, job.model)
        self.runner.wake()
        return job, False

    # ---- read ----

    async def get(self, job_id: str, key: str) -> Job:
        job = await self.store.get(job_id) if len(job_id) <= 64 else None
        if job is None or job.key != key:
            raise NotFound(f"No job found with id '{job_id[:64]}'.", param="job_id")
        if job.status == "in_progress":
            job.progress = await self.store.progress_of(job.id)
        return job

    async def page(self, key: str, *, limit: int, after: str | None, status: str | None) -> tuple[list[Job], bool]:
        if status is not None and status not in STATUSES:
            raise InvalidRequest(f"`status` must be one of {', '.join(STATUSES)}.", param="status")
        jobs = await self.store.page(key, limit=limit + 1, after=after, status=status)
        return jobs[:limit], len(jobs) > limit

    # ---- cancel ----

    async def cancel(self, job_id: str, key: str) -> Job:
        job = await self.get(job_id, key)
        if job.status == "queued":
            job.status = "canceled"
            if await self.runner.complete(job, None):
                return await self.get(job_id, key)
            job = await self.get(job_id, key)
        if job.status == "in_progress":
            await self.store.request_cancel(job_id)
            if self.runner.cancel_local(job_id):  # else the worker's next lease renewal sees the request
                await self.runner.wait_local(job_id, _CANCEL_WAIT_SECONDS)
        return await self.get(job_id, key)

    # ---- events ----

    async def events(self, job_id: str, key: str, *, keepalive_seconds: float) -> AsyncIterator[Job | None]:
        """The job now, then at every change of status, queue position, upstream request id (the
        upstream accepted the job) or upstream progress to its terminal state;
        None when `keepalive_seconds` passed without a change."""
        last: tuple[Any, ...] | None = None
        quiet_since = time.monotonic()
        while True:
            try:
                job = await self.get(job_id, key)
            except NotFound:  # removed meanwhile (retention): the stream ends
                return
            # also: the upstream took it, and what it reports on the running job
            state = (job.status, job.queue_position, job.upstream_request_id, job.progress)
            if state != last:
                last, quiet_since = state, time.monotonic()
                yield job
            elif time.monotonic() - quiet_since >= keepalive_seconds:
                quiet_since = time.monotonic()
                yield None
            if job.terminal:
                return
            await asyncio.sleep(_EVENT_POLL_SECONDS)

    # ---- execute (the workers' side) ----

    async def execute(self, job: Job, hooks: UpstreamHooks) -> Outcome:
        raw = await self.store.request_of(job.id)
        if raw is None:
            raise InternalError("The job's request is no longer stored.")
        request = await asyncio.to_thread(decode_request, raw)
        routes = {str(handle.get("route")) for handle in hooks.handles.values() if handle.get("route")}
        if routes:  # an upstream job exists: stay on its route (resume it; never pay twice elsewhere)
            request.route = sorted(routes)[0]
        service = self._client_service(job.key)
        token = active_hooks.set(hooks)
        try:
            result = await service.run(request, request_id=job.id, base_url=job.base_url)
        finally:
            active_hooks.reset(token)
        return result.body(), dict(result.headers)

    def _client_service(self, key: str) -> RunService:
        if self.access is None:
            return self.service
        client = self.access.keyring.by_name(key)
        return ClientService(self.access, self.service, client, None)


def public_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("x-imagegate-")}
