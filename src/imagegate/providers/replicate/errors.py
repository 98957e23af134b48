"""Replicate's failures -> GatewayErrors: the one function `map_error` (its docstring is the table),
with `input.*` field names renamed to the OpenAI parameters (`field_to_param`). Every error says
whether the prediction existed (or may have): `accepted`, never submitted again. What Replicate
wrote (details, titles, model errors, field names) reaches a message only through `core.redact`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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
from imagegate.providers.replicate.prediction import Prediction

__all__ = ["FIELD_PARAMS", "Stage", "field_to_param", "json_object", "map_error"]

# invalid_fields[].field (without `input.`) -> the OpenAI-side parameter it came from.
FIELD_PARAMS: Mapping[str, str] = {
    "aspect_ratio": "size",
    "image": "image",
    "output_format": "output_format",
    "output_quality": "output_compression",
    "guidance": "cfg_scale",
}
_CONTENT_POLICY = re.compile(r"\bE005\b|flagged as sensitive|NSFW|content policy", re.IGNORECASE)
_RETRYABLE_CODES = re.compile(r"\bE(?:1000|6716)\b")
_FIELD_IN_TEXT = re.compile(r"^(\w+) is required|[Aa]dditional property (\w+)")

# Where an HTTP error happened decides whether a new `run` could bill twice:
# create (rejected unless 5xx/timeout), upload (no job exists), poll/download (a prediction exists).
Stage = Literal["create", "upload", "poll", "download"]


def field_to_param(field: str, description: str = "") -> str | None:
    """`input.aspect_ratio` -> `size`, `input.output_quality` -> `output_compression`, ...;
    other `input.<name>` -> `<name>`; a bare `input` names the field in its description."""
    if field == "input":
        match = _FIELD_IN_TEXT.search(description)
        name = (match.group(1) or match.group(2)) if match else None
    elif field.startswith("input."):
        name = field.removeprefix("input.").split(".")[0].split("[")[0]
    else:
        return None
    return upstream_token(FIELD_PARAMS.get(name, name)) if name else None


def map_error(source: httpx.Response | Prediction, *, stage: Stage = "create") -> GatewayError:
    """The one translation of Replicate failures into the gateway's errors.

    HTTP (problem+json `title`/`detail`/`status`):
      401/403 -> UpstreamAuthFailed 502 (the token is never echoed)
      402     -> InsufficientCredit 402 (not retried; another provider may serve it)
      422 with `invalid_fields` on `input.*` -> InvalidRequest 400 naming the OpenAI parameter
      429     -> RateLimited (Retry-After header, else body `retry_after`); retryable on create
      413     -> PayloadTooLarge naming `image`
      503 on create without a prediction in the body -> ProviderUnavailable, retryable, NOT accepted:
                 Replicate refused the request (unavailable), no prediction was made, so a retry (and an
                 async job's requeue) cannot bill twice
      other 5xx -> create: not retryable (the prediction may exist: a resubmit could bill twice),
                 fallback allowed; upload: ProviderUnavailable, retryable; poll/download: UpstreamError
      400 on create -> InvalidRequest; 404 on create -> UpstreamError (unknown model: a route problem)
      other   -> UpstreamError 502 with Replicate's detail
    Accepted (the prediction exists, or may): every prediction error, poll/download errors, and a
    5xx other than a bare 503 answer to the create (a create held open by `Prefer: wait` may have
    made the prediction before a 500/502/504).
    Predictions:
      failed with E005 / "flagged as sensitive" / NSFW / content policy -> ContentPolicyViolation 400
      failed with E1000 / E6716 -> ProviderUnavailable (fallback; never a new prediction on this route)
      failed otherwise -> UpstreamError 502 with the model's message
      canceled / aborted -> UpstreamTimeout 504
      done but no output -> ContentPolicyViolation if the safety checker was on (all filtered),
                            else UpstreamError
    """
    if isinstance(source, Prediction):
        error = _prediction_error(source)
        accepted = True
    else:
        error = _http_error(source, stage)
        accepted = stage in ("poll", "download") or (
            stage == "create" and source.status_code >= 500 and not _refused_create(source)
        )
    error.accepted = accepted  # then never retryable
    return error


def _http_error(response: httpx.Response, stage: Stage) -> GatewayError:
    status = response.status_code
    body = json_object(response)
    detail = _text(body.get("detail")) or _text(body.get("title")) or _text(body.get("error"))
    detail = upstream_text(detail or response.reason_phrase or response.text) or f"HTTP {status}"
    prediction_exists = stage in ("poll", "download")
    if status in (401, 403):
        title = upstream_text(body.get("title"), limit=80)
        return UpstreamAuthFailed(
            f"Replicate rejected the configured API token (HTTP {status}{': ' + title if title else ''}). "
            "Check REPLICATE_API_TOKEN.",
            retryable=False,
        )
    if status == 402:
        return InsufficientCredit(f"Replicate: {detail}", retryable=False, fallback=True)
    if status == 429:
        return RateLimited(
            f"Replicate rate limit: {detail}",
            retry_after=retry_after_seconds(response.headers, body.get("retry_after")),
            retryable=not prediction_exists,
        )
    if status == 422 and stage == "create" and (invalid := _input_error(body)) is not None:
        return invalid
    if status == 413:
        return PayloadTooLarge(f"Replicate: {detail}", param="image")
    if status >= 500:
        message = f"Replicate answered HTTP {status}: {detail}"
        if stage == "upload":
            return ProviderUnavailable(message, retryable=True)
        if stage == "create" and status == 503:
            return ProviderUnavailable(message, retryable=_refused_create(response))
        return UpstreamError(message, retryable=False)
    if status == 400 and stage == "create":
        return InvalidRequest(f"Replicate rejected the request: {detail}")
    if status == 404 and stage == "create":
        return UpstreamError(f"Replicate does not know this model (HTTP 404): {detail}")
    return UpstreamError(f"Replicate answered HTTP {status}: {detail}")


def _refused_create(response: httpx.Response) -> bool:
    """A 503 to a create that carries no prediction: Replicate turned the request away, nothing ran."""
    return response.status_code == 503 and "id" not in json_object(response)


def _input_error(body: Mapping[str, Any]) -> InvalidRequest | None:
    """A 422 `Input validation failed` about `input.*` -> InvalidRequest; None if not about input."""
    fields = [f for f in body.get("invalid_fields") or [] if isinstance(f, dict)]
    for item in fields:
        field, description = _text(item.get("field")), _text(item.get("description"))
        param = field_to_param(field, description)
        if param is None:
            continue
        messages = "; ".join(d for d in (_text(f.get("description")) for f in fields) if d)
        code = "missing_required_parameter" if item.get("type") == "required" else "invalid_value"
        return InvalidRequest(
            f"Invalid value for '{param}': {upstream_text(messages or _text(body.get('detail')))}",
            param=param,
            code=code,
        )
    return None


def _prediction_error(prediction: Prediction) -> GatewayError:
    status = prediction.status
    error = upstream_text(_text(prediction.data.get("error")))
    if status == "failed":
        if _CONTENT_POLICY.search(error):
            return ContentPolicyViolation(f"Your request was rejected by Replicate's safety system: {error}")
        if _RETRYABLE_CODES.search(error):
            return ProviderUnavailable(f"Replicate could not run the prediction: {error}")
        return UpstreamError(f"The model failed: {error or 'no error message'}")
    if status in ("canceled", "aborted"):
        return UpstreamTimeout(
            f"The Replicate prediction was {status} before it finished (deadline reached or canceled)."
        )
    if prediction.data.get("data_removed"):
        return UpstreamError("Replicate already deleted the prediction's output.")
    inputs = prediction.data.get("input")
    checker_off = isinstance(inputs, dict) and inputs.get("disable_safety_checker") is True
    if not checker_off:
        return ContentPolicyViolation(
            "Replicate returned no images: every output was removed by the model's safety checker."
        )
    return UpstreamError("Replicate returned no images.")


def json_object(response: httpx.Response) -> dict[str, Any]:
    """The response body when it is a JSON object, else {} (problem+json, predictions, files)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""
