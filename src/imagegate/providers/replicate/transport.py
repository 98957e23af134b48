"""Replicate's HTTP protocol (see docs/reference: replicate-protocol.md), with plain httpx.

    create    POST {base}/models/{owner}/{name}/predictions   {"input": {...}}
              (or POST {base}/predictions {"version", "input"} for a pinned `owner/name:version`)
              headers: Authorization: Bearer <token>, Prefer: wait=N, Cancel-After: <deadline>s
    poll      GET  urls.get until the prediction is done (backoff, idempotent retries)
    cancel    POST urls.cancel (best effort)
    upload    POST {base}/files (multipart `content` + `metadata`) -> urls.get, for large inputs
    download  GET  output URLs; the Bearer token goes only to Replicate hosts

A prediction is done when its status is terminal (succeeded, failed, canceled, aborted) or
when it is `processing` with a non-empty `output` (sync mode returns as soon as the files
exist). Every upstream failure is translated by the one function `map_error`.
"""

from __future__ import annotations

import json
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
    ProviderUnavailable,
    RateLimited,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamTimeout,
)
from imagegate.core.request import FORMAT_MIME, InputImage
from imagegate.providers.base import ProviderImage
from imagegate.providers.common import (
    decode_data_uri,
    get_with_retry,
    poll_delays,
    retry_after_seconds,
    transport_error,
)

__all__ = [
    "TERMINAL_STATUSES",
    "Prediction",
    "ReplicateTransport",
    "Stage",
    "cancel_after_header",
    "field_to_param",
    "is_replicate_url",
    "map_error",
    "output_images",
    "prefer_wait_seconds",
]

PROVIDER = "replicate"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "aborted"})
READ_MARGIN = 5.0  # the create's read timeout is Prefer's wait plus this
CONNECT_TIMEOUT = 10.0
CANCEL_TIMEOUT = 5.0
UPLOAD_TIMEOUT = 120.0
MIN_CANCEL_AFTER = 5  # seconds; Replicate's minimum
MAX_WAIT = 60  # seconds; `Prefer: wait=N` accepts 1..60
MAX_REDIRECTS = 5
FILE_EXTENSIONS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp", "gif": "gif", "avif": "avif"}
# Hosts that may receive the token, besides the configured base_url's origin.
REPLICATE_HOSTS = frozenset({"api.replicate.com", "replicate.delivery"})
REPLICATE_HOST_SUFFIXES = (".replicate.delivery",)

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
_EXTENSION_MIME = {f".{ext}": FORMAT_MIME[fmt] for ext, fmt in FILE_EXTENSIONS.items()}

# Where an HTTP error happened decides whether a new `run` could bill twice:
# create (rejected unless 5xx/timeout), upload (no job exists), poll/download (a prediction exists).
Stage = Literal["create", "upload", "poll", "download"]


def prefer_wait_seconds(configured: int, remaining: float) -> int:
    """`Prefer: wait=N`: the configured wait, never more than the remaining deadline (1..60)."""
    return max(1, min(configured, MAX_WAIT, math.floor(remaining)))


def cancel_after_header(remaining: float) -> str:
    """`Cancel-After` from the gateway's remaining deadline, as a duration string (at least 5 s)."""
    return f"{max(MIN_CANCEL_AFTER, math.ceil(remaining))}s"


def is_replicate_url(url: str, base_url: str) -> bool:
    """May the token go to `url`? Only to https Replicate hosts, or the configured base_url's origin."""
    try:
        target, base = httpx.URL(url), httpx.URL(base_url)
    except httpx.InvalidURL:
        return False
    if (target.scheme, target.host, target.port) == (base.scheme, base.host, base.port):
        return True
    host = target.host.lower()
    return target.scheme == "https" and (host in REPLICATE_HOSTS or host.endswith(REPLICATE_HOST_SUFFIXES))


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
    return FIELD_PARAMS.get(name, name) if name else None


@dataclass
class Prediction:
    """The latest known state of one prediction."""

    data: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.data.get("id", ""))

    @property
    def status(self) -> str:
        return str(self.data.get("status", ""))

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def done(self) -> bool:
        """Terminal, or `processing` with every output file already there (sync mode)."""
        return self.terminal or (self.status == "processing" and bool(self.data.get("output")))

    def url(self, name: Literal["get", "cancel"], base_url: str) -> str:
        urls = self.data.get("urls")
        value = urls.get(name) if isinstance(urls, dict) else None
        if isinstance(value, str) and value:
            return value
        return f"{base_url}/predictions/{self.id}" + ("/cancel" if name == "cancel" else "")


def map_error(source: httpx.Response | Prediction, *, stage: Stage = "create") -> GatewayError:
    """The one translation of Replicate failures into the gateway's errors.

    HTTP (problem+json `title`/`detail`/`status`):
      401/403 -> UpstreamAuthFailed 502 (the token is never echoed)
      402     -> InsufficientCredit 402 (not retried; another provider may serve it)
      422 with `invalid_fields` on `input.*` -> InvalidRequest 400 naming the OpenAI parameter
      429     -> RateLimited (Retry-After header, else body `retry_after`); retryable on create
      413     -> PayloadTooLarge naming `image`
      5xx     -> create: not retryable (the prediction may exist: a resubmit could bill twice),
                 fallback allowed; upload: ProviderUnavailable, retryable; poll/download: UpstreamError
      400 on create -> InvalidRequest; 404 on create -> UpstreamError (unknown model: a route problem)
      other   -> UpstreamError 502 with Replicate's detail
    Predictions:
      failed with E005 / "flagged as sensitive" / NSFW / content policy -> ContentPolicyViolation 400
      failed with E1000 / E6716 -> ProviderUnavailable (retryable: a new prediction)
      failed otherwise -> UpstreamError 502 with the model's message
      canceled / aborted -> UpstreamTimeout 504
      done but no output -> ContentPolicyViolation if the safety checker was on (all filtered),
                            else UpstreamError
    """
    if isinstance(source, Prediction):
        return _prediction_error(source)
    return _http_error(source, stage)


def _http_error(response: httpx.Response, stage: Stage) -> GatewayError:
    status = response.status_code
    body = _json_object(response)
    detail = _text(body.get("detail")) or _text(body.get("title")) or _text(body.get("error"))
    detail = detail or response.reason_phrase or f"HTTP {status}"
    prediction_exists = stage in ("poll", "download")
    if status in (401, 403):
        title = _text(body.get("title"))
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
            return ProviderUnavailable(message, retryable=False)
        return UpstreamError(message, retryable=False)
    if status == 400 and stage == "create":
        return InvalidRequest(f"Replicate rejected the request: {detail}")
    if status == 404 and stage == "create":
        return UpstreamError(f"Replicate does not know this model (HTTP 404): {detail}")
    return UpstreamError(f"Replicate answered HTTP {status}: {detail}")


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
            f"Invalid value for '{param}': {messages or _text(body.get('detail'))}", param=param, code=code
        )
    return None


def _prediction_error(prediction: Prediction) -> GatewayError:
    status = prediction.status
    error = _text(prediction.data.get("error"))
    if status == "failed":
        if _CONTENT_POLICY.search(error):
            return ContentPolicyViolation(f"Your request was rejected by Replicate's safety system: {error}")
        if _RETRYABLE_CODES.search(error):
            return ProviderUnavailable(f"Replicate could not run the prediction: {error}", retryable=True)
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


def output_images(prediction: Prediction) -> list[ProviderImage]:
    """`output` as a list (a single string is wrapped): `data:` URIs decoded to bytes, http(s)
    URLs kept (content type from the extension when evident). Empty -> map_error's error."""
    output = prediction.data.get("output")
    items = [output] if isinstance(output, str) else output if isinstance(output, list) else []
    images: list[ProviderImage] = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise UpstreamError(f"Replicate returned an output that is not a file: {str(item)[:100]!r}.")
        if item.startswith("data:"):
            data, mime = decode_data_uri(item)
            images.append(ProviderImage(data=data, content_type=mime))
        elif item.startswith(("https://", "http://")):
            path = httpx.URL(item).path.lower()
            evident = next((m for ext, m in _EXTENSION_MIME.items() if path.endswith(ext)), None)
            images.append(ProviderImage(url=item, content_type=evident))
        else:
            raise UpstreamError(f"Replicate returned an output that is not a file: {item[:100]!r}.")
    if not images:
        raise map_error(prediction)
    return images


class ReplicateTransport:
    """The protocol calls, on the gateway's shared client. Holds no state between calls."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        token: str,
        base_url: str,
        wait_seconds: int = MAX_WAIT,
        poll_interval: float = 0.5,
        poll_max_interval: float = 3.0,
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.wait_seconds = wait_seconds
        self.poll_interval = poll_interval
        self.poll_max_interval = poll_max_interval
        self._token = token

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    async def create(self, model: str, inputs: Mapping[str, Any], *, deadline: float) -> Prediction:
        """Create a prediction in sync mode (`Prefer: wait=N`), with `Cancel-After` from the deadline."""
        remaining = deadline - time.monotonic()
        wait = prefer_wait_seconds(self.wait_seconds, remaining)
        headers = {**self._auth(), "Prefer": f"wait={wait}", "Cancel-After": cancel_after_header(remaining)}
        name, _, version = model.partition(":")
        if version:
            url, body = f"{self.base_url}/predictions", {"version": version, "input": dict(inputs)}
        else:
            url, body = f"{self.base_url}/models/{name}/predictions", {"input": dict(inputs)}
        try:
            response = await self.http.post(
                url, json=body, headers=headers, timeout=httpx.Timeout(wait + READ_MARGIN, connect=CONNECT_TIMEOUT)
            )
        except httpx.HTTPError as exc:
            raise transport_error(PROVIDER, exc, accepted=True) from None
        if not response.is_success:
            raise map_error(response, stage="create")
        return Prediction(_prediction_body(response))

    async def wait(self, prediction: Prediction, *, deadline: float) -> Prediction:
        """Poll `urls.get` with a growing interval until done; updates `prediction` in place.
        Raises map_error's error for failed/canceled/aborted, UpstreamTimeout past the deadline."""
        async for number in poll_delays(start=self.poll_interval, cap=self.poll_max_interval):
            if number:
                response = await get_with_retry(
                    self.http,
                    prediction.url("get", self.base_url),
                    provider=PROVIDER,
                    headers=self._auth(),
                    base=self.poll_interval,
                    cap=self.poll_max_interval,
                )
                if not response.is_success:
                    raise map_error(response, stage="poll")
                prediction.data = _prediction_body(response)
            if prediction.done:
                if prediction.status in ("failed", "canceled", "aborted"):
                    raise map_error(prediction)
                return prediction
            if time.monotonic() >= deadline:
                raise UpstreamTimeout("The Replicate prediction did not finish before the gateway's deadline.")
        raise AssertionError("poll_delays never ends")  # pragma: no cover

    async def cancel(self, prediction: Prediction) -> None:
        """POST `urls.cancel`; failures are the caller's to ignore (use `best_effort`)."""
        await self.http.post(prediction.url("cancel", self.base_url), headers=self._auth(), timeout=CANCEL_TIMEOUT)

    async def upload(self, image: InputImage, *, filename: str) -> str:
        """Files API: multipart `content` (filename + content type) and `metadata`; returns `urls.get`."""
        assert image.data is not None
        try:
            response = await self.http.post(
                f"{self.base_url}/files",
                files={"content": (filename, image.data, image.mime)},
                data={"metadata": json.dumps({"uploaded_by": "imagegate"})},
                headers=self._auth(),
                timeout=httpx.Timeout(UPLOAD_TIMEOUT, connect=CONNECT_TIMEOUT),
            )
        except httpx.HTTPError as exc:
            raise transport_error(PROVIDER, exc, accepted=False) from None
        if not response.is_success:
            raise map_error(response, stage="upload")
        urls = _json_object(response).get("urls")
        url = urls.get("get") if isinstance(urls, dict) else None
        if not isinstance(url, str) or not url:
            raise UpstreamError("Replicate's Files API answered without `urls.get`.")
        return url

    async def download(self, url: str) -> bytes:
        """GET an output file, following redirects; the token is sent only to Replicate hosts."""
        for _ in range(MAX_REDIRECTS + 1):
            headers = self._auth() if is_replicate_url(url, self.base_url) else None
            response = await get_with_retry(self.http, url, provider=PROVIDER, headers=headers)
            location = response.headers.get("location")
            if response.is_redirect and location:
                url = str(response.url.join(location))
                continue
            if not response.is_success:
                raise map_error(response, stage="download")
            return response.content
        raise UpstreamError("Replicate's output URL redirected too many times.")


def _prediction_body(response: httpx.Response) -> dict[str, Any]:
    body = _json_object(response)
    if not body.get("id") or not isinstance(body.get("status"), str):
        raise UpstreamError("Replicate answered with something that is not a prediction.")
    return body


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""
