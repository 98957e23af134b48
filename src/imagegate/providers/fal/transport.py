"""fal's HTTP protocol over plain httpx (fal-protocol.md): `Authorization: Key`, the queue (submit,
status by polling or SSE, result, cancel), the sync run, storage upload, and the one table that maps
fal's failures to GatewayErrors (`map_failure`).

Queue flow: POST {queue_url}/{model} -> {request_id, status_url, response_url, cancel_url}; the
returned URLs are used as given, never rebuilt. Follow status_url (202 IN_QUEUE / IN_PROGRESS, 200
COMPLETED) until COMPLETED, then ALWAYS GET response_url: COMPLETED is also the state of failed and
cancelled jobs, and the result endpoint answers with the app's own error status and body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from imagegate.core.errors import (
    ContentPolicyViolation,
    GatewayError,
    InsufficientCredit,
    InvalidRequest,
    PayloadTooLarge,
    ProviderNotConfigured,
    ProviderUnavailable,
    RateLimited,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamTimeout,
)
from imagegate.providers.common import (
    best_effort,
    get_with_retry,
    poll_delays,
    retry_after_seconds,
    transport_error,
)
from imagegate.settings import FalSettings

__all__ = [
    "FIELD_TO_PARAM",
    "NOT_CONFIGURED",
    "FalFailure",
    "FalOutput",
    "FalTransport",
    "QueueHandle",
    "Stage",
    "auth_header",
    "map_failure",
    "param_from_loc",
    "request_timeout_header",
]

log = logging.getLogger("imagegate.providers.fal")

PROVIDER = "fal"
NOT_CONFIGURED = "provider fal is not configured: set FAL_KEY (or FAL_KEY_ID and FAL_KEY_SECRET)"
USER_AGENT = "imagegate (fal adapter)"
MIN_REQUEST_TIMEOUT = 1.0  # fal's clients refuse X-Fal-Request-Timeout <= 1 s
SSE_READ_TIMEOUT = 30.0  # fal sends a keep-alive comment every 15 s
CANCEL_TIMEOUT = 5.0

# Where a failure happened decides whether the same call may be made again (see `_may_resend`).
Stage = Literal["submit", "run", "status", "result", "upload", "upload_put"]

# fal input field -> the gateway's (OpenAI) parameter name, for 422 errors; others are unchanged.
FIELD_TO_PARAM: Mapping[str, str] = {
    "image_urls": "image", "image_url": "image", "num_images": "n", "image_size": "size", "guidance_scale": "cfg_scale",
}
# Error types that name the input image when `loc` does not.
_TYPE_TO_PARAM: Mapping[str, str] = {"image_too_large": "image", "file_download_error": "image"}
# `error_type` -> the HTTP status fal gives it (§5.1), to map a COMPLETED status payload's error.
_TYPE_STATUS: Mapping[str, int] = {
    "request_timeout": 504, "startup_timeout": 504, "runner_incomplete_response": 502, "runner_server_error": 500,
    "runner_scheduling_failure": 503, "runner_connection_timeout": 503, "runner_disconnected": 503,
    "runner_connection_refused": 503, "runner_connection_error": 503,
    "client_disconnected": 499, "client_cancelled": 499, "bad_request": 400, "internal_error": 500,
}
_TRANSIENT = frozenset({408, 409, 429, 502, 503, 504})
# A low-balance account lock is answered with a message, not a documented status code.
_ACCOUNT_LOCKED = re.compile(r"\b(locked|balance|billing|credits?|payment)\b", re.IGNORECASE)


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


def param_from_loc(loc: Any) -> str | None:
    """["body", "image_urls", 0] -> "image": the first field name, renamed to the OpenAI parameter."""
    if not isinstance(loc, list):
        return None
    names = [part for part in loc if isinstance(part, str)]
    if names and names[0] in ("body", "query", "path"):
        names = names[1:]
    return FIELD_TO_PARAM.get(names[0], names[0]) if names else None


# ---- failures -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FalFailure:
    """What fal said when it failed, from either shape (§5.1): a model/validation error
    `{"detail": [{loc, msg, type}, ...]}` or a platform error `{"detail": str, "error_type": str}`."""

    status: int
    detail: str
    items: tuple[Mapping[str, Any], ...] = ()
    error_type: str | None = None
    request_id: str | None = None  # x-fal-request-id: fal's own servers (not the ingress) answered
    timeout_type: str | None = None  # X-Fal-Request-Timeout-Type
    retry_after: float | None = None
    fal_retryable: bool | None = None  # X-Fal-Retryable

    @classmethod
    def from_response(cls, response: httpx.Response, *, status_payload: Mapping[str, Any] | None = None) -> FalFailure:
        """Read a failed response; a COMPLETED status payload's `error`/`error_type` fill what the
        result body does not say."""
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        items: tuple[Mapping[str, Any], ...] = ()
        detail = ""
        error_type = None
        if isinstance(body, dict):
            raw = body.get("detail")
            if isinstance(raw, list):
                items = tuple(item for item in raw if isinstance(item, dict))
                detail = "; ".join(str(item.get("msg", "")) for item in items if item.get("msg"))
            elif isinstance(raw, str):
                detail = raw
            if isinstance(body.get("error_type"), str):
                error_type = body["error_type"]
        if not detail and body is None:
            detail = _ingress_text(response.text)
        headers = response.headers
        error_type = error_type or headers.get("x-fal-error-type")
        if status_payload is not None:
            error_type = error_type or _str(status_payload.get("error_type"))
            detail = detail or _str(status_payload.get("error")) or ""
        retryable = headers.get("x-fal-retryable", "").strip().lower()
        return cls(
            status=response.status_code,
            detail=detail[:500],
            items=items,
            error_type=error_type,
            request_id=headers.get("x-fal-request-id"),
            timeout_type=headers.get("x-fal-request-timeout-type"),
            retry_after=retry_after_seconds(headers),
            fal_retryable={"true": True, "false": False}.get(retryable),
        )

    @classmethod
    def from_status(cls, payload: Mapping[str, Any], request_id: str | None) -> FalFailure:
        """A COMPLETED status payload with `error`/`error_type` (and no usable result)."""
        error_type = _str(payload.get("error_type"))
        return cls(
            status=_TYPE_STATUS.get(error_type or "", 500),
            detail=(_str(payload.get("error")) or "the job failed")[:500],
            error_type=error_type,
            request_id=request_id,
        )


def map_failure(failure: FalFailure, *, stage: Stage, model: str) -> GatewayError:
    """The one table from fal failures to GatewayErrors (checked top to bottom)."""
    f = failure
    where = f" (HTTP {f.status}{', ' + f.error_type if f.error_type else ''})"
    if stage == "upload_put":  # a presigned storage URL, not fal's API: nothing was billed
        return ProviderUnavailable(f"fal storage rejected the upload (HTTP {f.status}).")
    policy = next((item for item in f.items if item.get("type") == "content_policy_violation"), None)
    if policy is not None:
        return ContentPolicyViolation(str(policy.get("msg") or f.detail), param=param_from_loc(policy.get("loc")))
    if (f.status in (401, 403) and _ACCOUNT_LOCKED.search(f.detail)) or f.status == 402:
        return InsufficientCredit("The upstream account cannot be billed (fal account locked).", fallback=True)
    if f.status in (401, 403):
        return UpstreamAuthFailed("upstream authentication failed")  # fal's detail is never echoed
    if f.status == 429:
        # Rejected at submit/run/upload: fal did not take the job. Later (status polls) it has.
        return RateLimited(f"fal is rate limiting requests{where}.", retry_after=f.retry_after,
                           retryable=stage in ("submit", "run", "upload"))
    if (f.status == 504 and (f.timeout_type or "").lower() == "user") or f.error_type == "request_timeout":
        # Our own X-Fal-Request-Timeout expired before a runner started: retrying here cannot fit
        # the same deadline better; another route may.
        return UpstreamTimeout("fal could not start the job before the deadline.", retryable=False)
    if f.status == 404:
        if stage in ("submit", "run"):
            return UpstreamError(f"fal has no app for model '{model}' (404); check the route's model id.")
        return UpstreamError(f"fal no longer knows this request (404 on its {stage} URL).")
    if f.status == 413:
        return PayloadTooLarge("fal rejected the request body as too large.", param="image", fallback=True)
    if f.status in (400, 422):
        item = f.items[0] if f.items else {}
        param = param_from_loc(item.get("loc")) or _TYPE_TO_PARAM.get(str(item.get("type")))
        return InvalidRequest(f.detail or f"fal rejected the request{where}.", param=param)
    if f.error_type in ("client_cancelled", "client_disconnected"):
        return UpstreamError(f"fal cancelled the job{where}.")
    retryable = _may_resend(f, stage)
    if f.status in _TRANSIENT or _is_runner_failure(f.error_type):
        return ProviderUnavailable(f"fal is unavailable{where}: {f.detail or 'no detail'}", retryable=retryable)
    return UpstreamError(f"fal failed{where}: {f.detail or 'no detail'}", retryable=retryable)


def _may_resend(f: FalFailure, stage: Stage) -> bool:
    """May the service make the same call again without risking a second bill?"""
    if f.fal_retryable is False:
        return False
    if stage in ("submit", "upload"):
        return True  # the queue answered with an error: nothing was queued; storage bills nothing
    if stage == "run" and f.request_id is None:
        return True  # an ingress (nginx) error: fal's servers never saw the request
    # The job ended in a runner/infra failure (5xx) and produced no output. fal does not bill 5xx
    # outcomes (§4.8), so submitting it again cannot charge twice. Anything else (e.g. a status poll
    # that kept failing: the job may still run and bill) is never resubmitted.
    failed_unbilled = _is_runner_failure(f.error_type) or bool(f.fal_retryable and f.status >= 500)
    return stage in ("run", "result") and failed_unbilled


def _is_runner_failure(error_type: str | None) -> bool:
    return error_type is not None and (error_type.startswith("runner_") or error_type == "startup_timeout")


def _ingress_text(text: str) -> str:
    """A short, tag-free line from an HTML error page (nginx)."""
    title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    return (title.group(1) if title else re.sub(r"<[^>]+>", " ", text)).strip()[:200]


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# ---- transport ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueHandle:
    """The submit response: the URLs are fal's, used exactly as returned."""

    model: str
    request_id: str
    status_url: str
    response_url: str
    cancel_url: str


@dataclass(frozen=True, slots=True)
class FalOutput:
    body: Any  # the model output JSON
    request_id: str | None


class FalTransport:
    """fal's protocol on the shared client. Every call carries a timeout derived from the deadline."""

    def __init__(self, http: httpx.AsyncClient, config: FalSettings) -> None:
        self.http = http
        self.config = config

    def headers(self) -> dict[str, str]:
        key = auth_header(self.config)
        if key is None:
            raise ProviderNotConfigured(NOT_CONFIGURED)
        return {"Authorization": key, "Accept": "application/json", "User-Agent": USER_AGENT}

    # ---- queue ----

    async def run_queued(self, model: str, payload: Mapping[str, Any], *, deadline: float) -> FalOutput:
        """Submit, follow the status until COMPLETED, fetch the result. If this is abandoned before
        the job finished (cancellation, deadline, lost status), the job is cancelled best-effort."""
        handle = await self.submit(model, payload, deadline=deadline)
        completed = False
        try:
            try:
                async with asyncio.timeout(_remaining(deadline)):
                    status = await self.wait(handle)
                    completed = True
                    return await self.result(handle, status)
            except TimeoutError:
                raise UpstreamTimeout("fal did not finish before the deadline.", retryable=False) from None
        except BaseException:
            if not completed:
                await best_effort(self.cancel(handle), timeout=CANCEL_TIMEOUT)
            raise

    async def submit(self, model: str, payload: Mapping[str, Any], *, deadline: float) -> QueueHandle:
        response = await self._post_model(f"{self.config.queue_url}/{model}", payload, deadline, stage="submit",
                                          model=model)
        body = _json(response)
        urls = {key: body.get(key) for key in ("request_id", "status_url", "response_url", "cancel_url")}
        if not all(isinstance(value, str) and value for value in urls.values()):
            raise UpstreamError("fal's submit response lacks request_id/status_url/response_url/cancel_url.")
        handle = QueueHandle(model, **urls)  # type: ignore[arg-type]
        log.info("fal submitted %s request_id=%s", model, handle.request_id)
        return handle

    async def wait(self, handle: QueueHandle) -> dict[str, Any]:
        """The COMPLETED status payload: from the SSE stream when enabled (polling if it breaks)."""
        if self.config.status_stream:
            status = await self.stream_status(handle)
            if status is not None:
                return status
            log.warning("fal status stream broke for %s; polling instead", handle.request_id)
        return await self.poll_status(handle)

    async def poll_status(self, handle: QueueHandle) -> dict[str, Any]:
        async for _ in poll_delays(start=self.config.poll_interval, cap=self.config.poll_max_interval):
            response = await get_with_retry(self.http, handle.status_url, provider=PROVIDER, headers=self.headers())
            body = _json_or_none(response)
            if response.status_code not in (200, 202) or not isinstance(body, dict):
                raise map_failure(FalFailure.from_response(response), stage="status", model=handle.model)
            if body.get("status") == "COMPLETED":
                return body
        raise AssertionError("unreachable")  # poll_delays never ends

    async def stream_status(self, handle: QueueHandle) -> dict[str, Any] | None:
        """Follow `{status_url}/stream` (SSE, `data:` lines of status JSON) to the COMPLETED event;
        None if the stream fails or ends first (the caller falls back to polling)."""
        url = httpx.URL(handle.status_url)
        url = url.copy_with(path=url.path.rstrip("/") + "/stream")
        headers = {**self.headers(), "Accept": "text/event-stream"}
        timeout = httpx.Timeout(SSE_READ_TIMEOUT, connect=10.0)
        try:
            async with self.http.stream("GET", url, headers=headers, timeout=timeout) as response:
                if response.status_code != 200:
                    return None
                data: list[str] = []
                async for line in response.aiter_lines():
                    if line:
                        field, _, value = line.partition(":")
                        if field == "data":
                            data.append(value.removeprefix(" "))
                        continue
                    event, data = _sse_event(data), []
                    if event is not None and event.get("status") == "COMPLETED":
                        return event
                event = _sse_event(data)
                return event if event is not None and event.get("status") == "COMPLETED" else None
        except httpx.HTTPError:
            return None

    async def result(self, handle: QueueHandle, status: Mapping[str, Any]) -> FalOutput:
        """GET response_url and branch on its HTTP status (200 is the only success)."""
        async for _ in poll_delays(start=self.config.poll_interval, cap=self.config.poll_max_interval):
            response = await self._get_result(handle.response_url)
            if response.status_code != 202:  # 202: not finished yet (should not follow COMPLETED)
                break
        request_id = response.headers.get("x-fal-request-id") or handle.request_id
        if response.status_code != 200:
            failure = FalFailure.from_response(response, status_payload=status)
            raise map_failure(failure, stage="result", model=handle.model)
        body = _json(response)
        failed = status.get("error") is not None or status.get("error_type") is not None
        if failed and not (isinstance(body, dict) and body.get("images")):
            raise map_failure(FalFailure.from_status(status, request_id), stage="result", model=handle.model)
        return FalOutput(body, request_id)

    async def _get_result(self, url: str) -> httpx.Response:
        """One GET; only a transient answer (ingress error, 408/409/429, connection failure) is
        retried. A failed job's result repeats its error, so retrying that would only waste time."""
        try:
            response = await self.http.get(url, headers=self.headers())
        except httpx.HTTPError:
            response = None
        if response is None or (response.status_code in _TRANSIENT and "x-fal-request-id" not in response.headers):
            response = await get_with_retry(self.http, url, provider=PROVIDER, headers=self.headers())
        return response

    async def cancel(self, handle: QueueHandle) -> None:
        """PUT cancel_url. Best effort: its answers (OK, CANCELLATION_REQUESTED 202,
        ALREADY_COMPLETED 400, NOT_FOUND; exact codes undocumented) are only logged."""
        try:
            response = await self.http.put(handle.cancel_url, headers=self.headers(), timeout=CANCEL_TIMEOUT)
        except httpx.HTTPError as exc:
            log.info("fal cancel %s failed: %s", handle.request_id, type(exc).__name__)
            return
        log.info("fal cancel %s -> %s", handle.request_id, response.status_code)

    # ---- sync run ----

    async def run_sync(self, model: str, payload: Mapping[str, Any], *, deadline: float) -> FalOutput:
        """POST {run_url}/{model}: the output in one response (no cancel URL: a cancelled call just
        drops the connection)."""
        response = await self._post_model(f"{self.config.run_url}/{model}", payload, deadline, stage="run",
                                          model=model)
        body = _json(response)
        request_id = response.headers.get("x-fal-request-id")
        if request_id is None and isinstance(body, dict):
            request_id = _str(body.get("request_id"))
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
            # Once the body may have been sent, fal may have taken the job: not retryable.
            raise transport_error(PROVIDER, exc, accepted=True) from exc
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
    return httpx.Timeout(seconds, connect=min(seconds, 10.0))


def _json(response: httpx.Response) -> dict[str, Any]:
    body = _json_or_none(response)
    if not isinstance(body, dict):
        raise UpstreamError(f"fal answered HTTP {response.status_code} with a body that is not a JSON object.")
    return body


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _sse_event(data: list[str]) -> dict[str, Any] | None:
    if not data:
        return None
    try:
        event = json.loads("\n".join(data))
    except ValueError:
        return None
    return event if isinstance(event, dict) else None
