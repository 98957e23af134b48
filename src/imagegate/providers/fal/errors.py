"""fal's failures -> GatewayErrors: the one table (`map_failure`), read from either failure shape
(`FalFailure`), with fal input field names renamed to the OpenAI parameters (`FIELD_TO_PARAM`).

`Stage` (where the failure happened) decides whether fal had taken the job (`accepted`, see
`_accepted`) and so whether the same call may be made again (`_may_resend`): a job fal took is
never submitted again. Everything fal wrote (details, messages, error types, field names) is
untrusted text and reaches a message only through `core.redact`.
"""

from __future__ import annotations

import re
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
    ProviderUnavailable,
    RateLimited,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamTimeout,
)
from imagegate.core.redact import upstream_text, upstream_token
from imagegate.providers.common import retry_after_seconds

__all__ = [
    "FIELD_TO_PARAM",
    "INGRESS_STATUSES",
    "TRANSIENT_STATUSES",
    "FalFailure",
    "Stage",
    "is_ingress_error",
    "map_failure",
    "param_from_loc",
]

# Where a failure happened decides whether the same call may be made again (see `_may_resend`).
Stage = Literal["submit", "run", "status", "result", "upload", "upload_put"]

# fal input field -> the gateway's (OpenAI) parameter name, for 422 errors; others are unchanged.
FIELD_TO_PARAM: Mapping[str, str] = {
    "image_urls": "image", "image_url": "image", "num_images": "n", "image_size": "size", "guidance_scale": "cfg_scale",
}  # fmt: skip
# Error types that name the input image when `loc` does not.
_TYPE_TO_PARAM: Mapping[str, str] = {"image_too_large": "image", "file_download_error": "image"}
# `error_type` -> the HTTP status fal gives it (§5.1), to map a COMPLETED status payload's error.
_TYPE_STATUS: Mapping[str, int] = {
    "request_timeout": 504, "startup_timeout": 504, "runner_incomplete_response": 502, "runner_server_error": 500,
    "runner_scheduling_failure": 503, "runner_connection_timeout": 503, "runner_disconnected": 503,
    "runner_connection_refused": 503, "runner_connection_error": 503,
    "client_disconnected": 499, "client_cancelled": 499, "bad_request": 400, "internal_error": 500,
}  # fmt: skip
# Statuses that say "try again" (a busy or restarting upstream), not "this request is wrong".
TRANSIENT_STATUSES = frozenset({408, 409, 429, 502, 503, 504})
# What fal's ingress (nginx) answers when fal's own servers never saw the request (§5.1).
INGRESS_STATUSES = frozenset({502, 503, 504})
# Failures that prove no runner ever got the request (fal-protocol.md §5.1): the job never ran.
_NEVER_RAN_TYPES = frozenset({
    "runner_scheduling_failure", "runner_connection_refused", "runner_connection_timeout", "request_timeout",
    "startup_timeout",
})  # fmt: skip
# A low-balance account lock is answered with a message, not a documented status code.
_ACCOUNT_LOCKED = re.compile(r"\b(locked|balance|billing|credits?|payment)\b", re.IGNORECASE)


def param_from_loc(loc: Any) -> str | None:
    """["body", "image_urls", 0] -> "image": the first field name, renamed to the OpenAI parameter."""
    if not isinstance(loc, list):
        return None
    names = [part for part in loc if isinstance(part, str)]
    if names and names[0] in ("body", "query", "path"):
        names = names[1:]
    return upstream_token(FIELD_TO_PARAM.get(names[0], names[0])) if names else None


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
                detail = "; ".join(_str(item.get("msg")) or "" for item in items if item.get("msg"))
            elif isinstance(raw, str):
                detail = raw
            if isinstance(body.get("error_type"), str):
                error_type = body["error_type"]
        if not detail and body is None:
            detail = response.text  # an ingress (nginx) page: upstream_text keeps its title
        headers = response.headers
        error_type = error_type or headers.get("x-fal-error-type")
        if status_payload is not None:
            error_type = error_type or _str(status_payload.get("error_type"))
            detail = detail or _str(status_payload.get("error")) or ""
        retryable = headers.get("x-fal-retryable", "").strip().lower()
        return cls(
            status=response.status_code,
            detail=upstream_text(detail, limit=500),
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
            detail=upstream_text(_str(payload.get("error")), limit=500) or "the job failed",
            error_type=error_type,
            request_id=request_id,
        )


def map_failure(failure: FalFailure, *, stage: Stage, model: str) -> GatewayError:
    """The one table from fal failures to GatewayErrors, each marked `accepted` when fal had taken
    the job (`_accepted`)."""
    error = _map(failure, stage, model)
    error.accepted = _accepted(failure, stage)  # then never retryable
    return error


def _map(failure: FalFailure, stage: Stage, model: str) -> GatewayError:
    """The table itself (checked top to bottom)."""
    f = failure
    error_type = upstream_token(f.error_type)
    where = f" (HTTP {f.status}{', ' + error_type if error_type else ''})"
    if stage == "upload_put":  # a presigned storage URL, not fal's API: nothing was billed
        return ProviderUnavailable(f"fal storage rejected the upload (HTTP {f.status}).")
    policy = next((item for item in f.items if item.get("type") == "content_policy_violation"), None)
    if policy is not None:
        message = upstream_text(policy.get("msg")) or f.detail or "fal's content checker rejected the request."
        return ContentPolicyViolation(message, param=param_from_loc(policy.get("loc")))
    if (f.status in (401, 403) and _ACCOUNT_LOCKED.search(f.detail)) or f.status == 402:
        return InsufficientCredit("The upstream account cannot be billed (fal account locked).", fallback=True)
    if f.status in (401, 403):
        return UpstreamAuthFailed("upstream authentication failed")  # fal's detail is never echoed
    if f.status == 429:
        # Rejected at submit/run/upload: fal did not take the job. Later (status polls) it has.
        return RateLimited(
            f"fal is rate limiting requests{where}.",
            retry_after=f.retry_after,
            retryable=stage in ("submit", "run", "upload"),
        )
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
    if f.status in TRANSIENT_STATUSES or _is_runner_failure(f.error_type):
        return ProviderUnavailable(f"fal is unavailable{where}: {f.detail or 'no detail'}", retryable=retryable)
    return UpstreamError(f"fal failed{where}: {f.detail or 'no detail'}", retryable=retryable)


def _accepted(f: FalFailure, stage: Stage) -> bool:
    """Had fal taken the job when this failure happened (or may it have)?

    status/result: yes, the submit was answered with a handle. upload: no job exists. submit and
    sync run: fal's answer IS the verdict; a 5xx from fal's own servers (`x-fal-request-id`) may come
    from a job that was queued or ran (a sync run's 500 is the app failing), unless its error type
    proves no runner ever got it. Ingress pages, 4xx and 429 are refusals."""
    if stage in ("status", "result"):
        return True
    if stage in ("upload", "upload_put") or f.status < 500 or is_ingress_error(f):
        return False
    return f.error_type not in _NEVER_RAN_TYPES


def _may_resend(f: FalFailure, stage: Stage) -> bool:
    """May the service make the same call again? Only when fal cannot have taken it: storage
    uploads, and submits/runs refused by the ingress or by a failure that proves no runner got it
    (§5.2). 429 and connection errors are decided before this."""
    if f.fal_retryable is False or _accepted(f, stage):
        return False
    if stage == "upload":
        return True  # storage bills nothing
    return stage in ("submit", "run") and (is_ingress_error(f) or f.error_type in _NEVER_RAN_TYPES)


def is_ingress_error(f: FalFailure) -> bool:
    """502/503/504 without `x-fal-request-id`: fal's ingress (nginx) answered, fal never saw it."""
    return f.status in INGRESS_STATUSES and f.request_id is None


def _is_runner_failure(error_type: str | None) -> bool:
    return error_type is not None and (error_type.startswith("runner_") or error_type == "startup_timeout")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
