"""fal's HTTP protocol over plain httpx (fal-protocol.md): `Authorization: Key`, the queue (submit,
status by polling or SSE, result, cancel), the sync run and storage upload. The status and result
requests, with the handle types, are in `status.py` (`StatusFollower`, a base of `FalTransport`).
fal's failures become GatewayErrors through the one table in `errors.py` (`map_failure`).

Queue flow: POST {queue_url}/{model} -> {request_id, status_url, response_url, cancel_url}; the
returned URLs are used as given, never rebuilt. Follow status_url (202 IN_QUEUE / IN_PROGRESS, 200
COMPLETED) until COMPLETED, then ALWAYS GET response_url: COMPLETED is also the state of failed and
cancelled jobs, and the result endpoint answers with the app's own error status and body.

The key goes only to the configured fal hosts (the origins of queue_url, run_url and rest_url): a
submit response whose URLs name any other host is refused (the job is cancelled through the
configured queue host) and nothing is sent there. Every failure after the submit was answered
with a handle is marked `accepted`: the job is never submitted again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from imagegate.core.deadline import within
from imagegate.core.errors import GatewayError, ProviderNotConfigured, UpstreamError, UpstreamTimeout
from imagegate.providers.common import (
    best_effort,
    never_sent,
    on_origins,
    transport_error,
)
from imagegate.providers.fal.errors import FalFailure, Stage, map_failure
from imagegate.providers.fal.progress import OnProgress, ProgressReporter
from imagegate.providers.fal.status import PROVIDER, FalOutput, FirstLook, QueueHandle, StatusCadence, StatusFollower
from imagegate.providers.fal.stream import StatusStream, stream_slots
from imagegate.providers.fal.wire import json_object as _json
from imagegate.settings import FalSettings
from imagegate.upstream_http import call_timeout
from imagegate.upstream_response import response_header

__all__ = [
    "NOT_CONFIGURED", "FalTransport", "auth_header", "request_timeout_header",
]

log = logging.getLogger("imagegate.providers.fal")

NOT_CONFIGURED = "provider fal is not configured: set FAL_KEY (or FAL_KEY_ID and FAL_KEY_SECRET)"
USER_AGENT = "imagegate (fal adapter)"
MIN_REQUEST_TIMEOUT = 1.0  # fal's clients refuse X-Fal-Request-Timeout <= 1 s
CANCEL_TIMEOUT = 5.0


def auth_header(config: FalSettings) -> str | None:
    """`Key <FAL_KEY>`, else `Key <FAL_KEY_ID>:<FAL_KEY_SECRET>`; None when neither is set."""
    if config.key is not None:
        return f"Key {config.key.get_secret_value()}"
    if config.key_id is not None and config.key_secret is not None:
        return f"Key {config.key_id.get_secret_value()}:{config.key_secret.get_secret_value()}"
    return None


def request_timeout_header(remaining: float) -> str | None:
    """X-Fal-Request-Timeout (fal's time-to-start deadline) for `remaining` seconds, rounded down
    to 0.1 s; None when 1 s or less is left (fal's clients do not send such values)."""
    value = math.floor(remaining * 10) / 10
    return f"{value:.1f}" if value > MIN_REQUEST_TIMEOUT else None


OnAccepted = Callable[["QueueHandle"], Awaitable[None]]
_HANDLE_URLS = ("status_url", "response_url", "cancel_url")  # the submit response's URLs, in QueueHandle's order


# ---- transport ------------------------------------------------------------------------------------


class FalTransport(StatusFollower):
    """fal's protocol on the shared client. Every call carries a timeout derived from the deadline."""

    def __init__(self, http: httpx.AsyncClient, config: FalSettings) -> None:
        self.http = http
        self.config = config
        self.stream = StatusStream(http, stream_slots(config))
        self.first_look = FirstLook()
        self._auth: tuple[tuple[object, ...], str | None] = ((), None)  # (the key settings, auth_header of them)

    def auth(self) -> str | None:
        """`auth_header(config)`, worked out again only when the key settings change (every call asks)."""
        config = self.config
        keys = (config.key, config.key_id, config.key_secret)
        if keys != self._auth[0]:
            self._auth = (keys, auth_header(config))
        return self._auth[1]

    def headers(self) -> dict[str, str]:
        key = self.auth()
        if key is None:
            raise ProviderNotConfigured(NOT_CONFIGURED)
        return {"Authorization": key, "Accept": "application/json", "User-Agent": USER_AGENT}

    # ---- queue ----

    async def run_queued(
        self,
        model: str,
        payload: Mapping[str, Any],
        *,
        deadline: float,
        on_accepted: OnAccepted | None = None,
        detached: Callable[[], bool] | None = None,
        on_progress: OnProgress | None = None,
        cadence: StatusCadence | None = None,
    ) -> FalOutput:
        """Submit, follow the status until COMPLETED, fetch the result. If this is abandoned before
        the job finished (cancellation, deadline, lost status), the job is cancelled best-effort,
        even one whose submit was still on the wire: fal may accept it after we stopped waiting."""
        # The submit runs in a task of its own, which sets `answer`: the caller's cancellation
        # cancels `answer`, never the submit (what `asyncio.shield` does, one loop pass sooner).
        answer: asyncio.Future[QueueHandle] = asyncio.get_running_loop().create_future()
        submitting = asyncio.ensure_future(self._submit_into(answer, model, payload, deadline))
        try:
            handle = await answer
        except asyncio.CancelledError:
            await best_effort(self._cancel_once_submitted(submitting), timeout=CANCEL_TIMEOUT)
            raise
        return await self.follow(
            handle, deadline=deadline, on_accepted=on_accepted, detached=detached, on_progress=on_progress,
            cadence=cadence,
        )

    async def follow(
        self,
        handle: QueueHandle,
        *,
        deadline: float,
        on_accepted: OnAccepted | None = None,
        detached: Callable[[], bool] | None = None,
        on_progress: OnProgress | None = None,
        cadence: StatusCadence | None = None,
    ) -> FalOutput:
        """Follow an accepted job to its output (also a job submitted before a restart: an async
        job resumes here). `on_accepted(handle)` runs first (an async job persists the handle);
        `on_progress` gets each changed status report (the status is then asked with `?logs=1`);
        `cadence` says how the status is followed (default: the configured stream or polling).
        Abandoned before the job finished, the job is cancelled, unless `detached()` says the
        caller is only stopping and another worker will resume it."""
        completed = False
        try:
            if on_accepted is not None:
                await on_accepted(handle)
            try:
                with within(_remaining(deadline)):
                    status = await self.wait(handle, ProgressReporter(on_progress) if on_progress else None, cadence)
                    completed = True
                    return await self.result(handle, status)
            except TimeoutError:
                raise UpstreamTimeout("fal did not finish before the deadline.", retryable=False) from None
        except GatewayError as exc:
            exc.accepted = True  # fal answered the submit with a handle: the job is fal's
            if not completed:
                await best_effort(self.cancel(handle), timeout=CANCEL_TIMEOUT)
            raise
        except BaseException:
            if not completed and not (detached is not None and detached()):
                await best_effort(self.cancel(handle), timeout=CANCEL_TIMEOUT)
            raise

    async def _submit_into(
        self, answer: asyncio.Future[QueueHandle], model: str, payload: Mapping[str, Any], deadline: float
    ) -> QueueHandle | None:
        """`submit`, its outcome set on `answer` (unless that was cancelled); returns the handle, or
        None when the submit failed (its error is `answer`'s, not this task's)."""
        try:
            handle = await self.submit(model, payload, deadline=deadline)
        except asyncio.CancelledError:
            answer.cancel()
            raise
        except BaseException as exc:
            if not answer.done():
                answer.set_exception(exc)
            if isinstance(exc, Exception):
                return None
            raise  # KeyboardInterrupt, SystemExit
        if not answer.done():
            answer.set_result(handle)
        return handle

    async def _cancel_once_submitted(self, submitting: asyncio.Future[QueueHandle | None]) -> None:
        handle = await submitting
        if handle is not None:
            await self.cancel(handle)

    async def submit(self, model: str, payload: Mapping[str, Any], *, deadline: float) -> QueueHandle:
        response = await self._post_model(f"{self.config.queue_url}/{model}", payload, deadline, stage="submit",
                                          model=model)
        # fal answered 200: the job may be queued even if the answer is unusable, so it is never resubmitted.
        body = _json(response, accepted=True)
        urls: tuple[Any, ...] = (
            body.get("request_id"), body.get("status_url"), body.get("response_url"), body.get("cancel_url")
        )
        if not all(isinstance(value, str) and value for value in urls):
            raise UpstreamError("fal's submit response lacks request_id/status_url/response_url/cancel_url.",
                                accepted=True)
        handle = QueueHandle(model, *urls)
        log.debug("fal submitted %s request_id=%s", model, handle.request_id)
        foreign = [key for key, url in zip(_HANDLE_URLS, urls[1:], strict=True) if not self.is_fal_url(url)]
        if foreign:
            # Never send the key elsewhere; cancel the job through the configured queue host instead.
            await best_effort(self._cancel_at(self._own_cancel_url(model, handle.request_id)), timeout=CANCEL_TIMEOUT)
            raise UpstreamError(
                f"fal's submit response named a host that is not a configured fal host ({', '.join(foreign)}); "
                "the gateway does not send its key there.",
                accepted=True,
            )
        return handle

    def fal_origins(self) -> tuple[str, ...]:
        return (self.config.queue_url, self.config.run_url, self.config.rest_url)

    def is_fal_url(self, url: str) -> bool:
        """May the key go to `url`? Only to the origins of the configured queue, run and rest URLs."""
        return on_origins(url, self.fal_origins())

    def _own_cancel_url(self, model: str, request_id: str) -> str:
        """The cancel URL on the configured queue host (`{owner}/{app}`, fal-protocol.md §2)."""
        parts = [part for part in model.split("/") if part]
        app = "/".join(parts[:3] if parts and parts[0] in ("workflows", "comfy") else parts[:2])
        return f"{self.config.queue_url.rstrip('/')}/{app}/requests/{quote(request_id, safe='')}/cancel"

    async def cancel(self, handle: QueueHandle) -> None:
        """PUT cancel_url. Best effort: its answers (OK, CANCELLATION_REQUESTED 202,
        ALREADY_COMPLETED 400, NOT_FOUND; exact codes undocumented) are only logged."""
        url = handle.cancel_url
        if not self.is_fal_url(url):
            url = self._own_cancel_url(handle.model, handle.request_id)
        await self._cancel_at(url)

    async def _cancel_at(self, url: str) -> None:
        try:
            response = await self.http.put(url, headers=self.headers(), timeout=CANCEL_TIMEOUT)
        except httpx.HTTPError as exc:
            log.info("fal cancel %s failed: %s", url, type(exc).__name__)
            return
        log.info("fal cancel %s -> %s", url, response.status_code)

    # ---- sync run ----

    async def run_sync(self, model: str, payload: Mapping[str, Any], *, deadline: float) -> FalOutput:
        """POST {run_url}/{model}: the output in one response (no cancel URL: a cancelled call just
        drops the connection)."""
        response = await self._post_model(f"{self.config.run_url}/{model}", payload, deadline, stage="run",
                                          model=model)
        body = _json(response, accepted=True)  # the run answered 200: it ran
        request_id = response_header(response, "x-fal-request-id")
        if request_id is None and isinstance(body.get("request_id"), str):
            request_id = body["request_id"]
        return FalOutput(body, request_id)

    async def _post_model(
        self, url: str, payload: Mapping[str, Any], deadline: float, *, stage: Stage, model: str
    ) -> httpx.Response:
        remaining = _remaining(deadline)
        headers = self.headers()
        if (value := request_timeout_header(remaining)) is not None:
            headers["X-Fal-Request-Timeout"] = value
        try:
            response = await self.http.post(url, json=payload, headers=headers, timeout=_timeout(remaining))
        except httpx.HTTPError as exc:
            # Once the body may have been sent, fal may have taken the job: not retryable. Only a
            # failure to connect proves fal never saw it (§5.2).
            raise transport_error(PROVIDER, exc, accepted=not never_sent(exc)) from exc
        if response.status_code != 200:
            raise map_failure(FalFailure.from_response(response), stage=stage, model=model)
        return response

    # ---- storage ----

    async def upload(self, data: bytes, *, content_type: str, file_name: str, timeout: float) -> str:
        """Initiate (Key auth) -> {upload_url, file_url}; PUT the raw bytes (no fal auth) -> file_url."""
        try:
            response = await self.http.post(
                f"{self.config.rest_url}/storage/upload/initiate",
                params={"storage_type": "fal-cdn-v3"},
                json={"content_type": content_type, "file_name": file_name},
                headers=self.headers(),
                timeout=_timeout(timeout),
            )
        except httpx.HTTPError as exc:
            raise transport_error(PROVIDER, exc, accepted=False) from exc
        if response.status_code != 200:
            raise map_failure(FalFailure.from_response(response), stage="upload", model="storage")
        body = _json(response)
        upload_url, file_url = body.get("upload_url"), body.get("file_url")
        if not isinstance(upload_url, str) or not isinstance(file_url, str):
            raise UpstreamError("fal storage did not return upload_url and file_url.")
        try:
            put = await self.http.put(
                upload_url, content=data, headers={"Content-Type": content_type}, timeout=_timeout(timeout)
            )
        except httpx.HTTPError as exc:
            raise transport_error(PROVIDER, exc, accepted=False) from exc
        if not put.is_success:
            raise map_failure(FalFailure.from_response(put), stage="upload_put", model="storage")
        return file_url



def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise UpstreamTimeout("fal did not finish before the deadline.", retryable=False)
    return remaining


def _timeout(seconds: float) -> httpx.Timeout:
    return call_timeout(seconds, connect=min(seconds, 10.0))
