"""The OpenAI Images API wire protocol (see docs/reference: openai-images-api.md), with plain httpx.

    generate  POST {base}/images/generations   JSON
    edit      POST {base}/images/edits         multipart: repeated `image[]` parts (`image` for dall-e),
                                               `mask` part, scalar fields as text
                                               JSON (when an input is a URL): `images: [{"image_url"}]`,
                                               `mask: {"image_url"}`
    response  {"data": [{"b64_json" | "url", "revised_prompt"?}], ...}

Request building and response parsing are pure functions; `OpenAITransport.call` does the I/O.
Upstream failures are translated by the one function `map_error`. A call is synchronous: once the
request was sent, the upstream may have made (and billed) the image, so every failure after that
is `accepted` unless the answer proves otherwise (4xx, 429, 503, `x-should-retry: true`). What the
upstream wrote reaches a message only through `core.redact`.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
)
from imagegate.core.redact import scrub, upstream_text, upstream_token
from imagegate.core.request import FORMAT_MIME, Operation
from imagegate.providers.base import ProviderImage, ProviderResult
from imagegate.providers.common import (
    decode_data_uri,
    download,
    never_sent,
    retry_after_seconds,
    transport_error,
)

__all__ = [
    "OpenAITransport",
    "UpstreamCall",
    "build_call",
    "download_output",
    "map_error",
    "parse_images",
    "sniff_mime",
]

PROVIDER = "openai"
CONNECT_TIMEOUT = 10.0
MAX_REDIRECTS = 5
DOWNLOAD_ATTEMPTS = 5  # an output GET is idempotent
_CONTENT_POLICY_CODES = frozenset({"moderation_blocked", "content_policy_violation"})
_BILLING_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}


@dataclass(frozen=True)
class UpstreamCall:
    """One request, ready to send: a JSON body, or multipart `data` fields plus `files` parts."""

    path: str
    json: dict[str, Any] | None = None
    data: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] = field(default_factory=list)


def build_call(
    operation: Operation, model: str, payload: Mapping[str, Any], *, response_format: bool, single_image: bool = False
) -> UpstreamCall:
    """The request for one payload. Edits whose inputs are all `data:` URIs go as multipart (repeated
    `image[]`, or one `image` part when `single_image`); an input URL switches to the JSON edit form.
    `response_format` adds `response_format: b64_json` (dall-e models only)."""
    fields = {key: value for key, value in payload.items() if key not in ("image", "mask") and value is not None}
    fields = {"model": model, **fields}
    if response_format:
        fields["response_format"] = "b64_json"
    if operation == "generate":
        return UpstreamCall("/images/generations", json=fields)
    refs: Sequence[str] = payload.get("image") or []
    mask: str | None = payload.get("mask")
    if any(not ref.startswith("data:") for ref in (*refs, *([mask] if mask else []))):
        body = {**fields, "images": [{"image_url": ref} for ref in refs]}
        if mask:
            body["mask"] = {"image_url": mask}
        return UpstreamCall("/images/edits", json=body)
    part = "image" if single_image else "image[]"
    files = [(part, _file_part(f"image-{i}", ref)) for i, ref in enumerate(refs)]
    if mask:
        files.append(("mask", _file_part("mask", mask)))
    return UpstreamCall("/images/edits", data={key: _form_value(value) for key, value in fields.items()}, files=files)


def _file_part(stem: str, uri: str) -> tuple[str, bytes, str]:
    data, mime = decode_data_uri(uri)
    return f"{stem}.{_EXTENSIONS.get(mime, 'png')}", data, mime


def _form_value(value: Any) -> str:
    """Scalars as the SDKs send them: booleans `true`/`false`, numbers in decimal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value)


def sniff_mime(data: bytes) -> str | None:
    """The image type from its magic bytes (png, jpeg, gif, webp)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _MAGIC if data.startswith(magic)), None)


def parse_images(body: Any, *, output_format: str | None = None) -> tuple[list[ProviderImage], str | None]:
    """`data[].b64_json` or `data[].url`, and the first `revised_prompt`. `b64_json` is NOT decoded
    here (that is CPU work for the image pool at delivery): it becomes a `data:` URL whose type is
    sniffed from the first few bytes only, else the asked `output_format`."""
    items = body.get("data") if isinstance(body, dict) else None
    images: list[ProviderImage] = []
    revised: str | None = None
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        if revised is None and isinstance(item.get("revised_prompt"), str):
            revised = scrub(item["revised_prompt"])  # upstream text shown to the client: no credentials
        if isinstance(b64 := item.get("b64_json"), str) and b64:
            mime = sniff_mime(_b64_head(b64)) or FORMAT_MIME.get(output_format or "")
            uri = f"data:{mime or 'application/octet-stream'};base64,{b64}"
            images.append(ProviderImage(url=uri, content_type=mime))
        elif isinstance(url := item.get("url"), str) and url:
            images.append(ProviderImage(url=url))
    if not images:
        raise UpstreamError("The upstream returned no images.")
    return images, revised


def _b64_head(b64: str) -> bytes:
    """The first 12 bytes of a base64 string (enough for `sniff_mime`), decoding 16 characters only;
    b"" when they are not base64 (the whole payload is validated when it is decoded, at delivery)."""
    try:
        return base64.b64decode(b64[:16], validate=True)
    except (binascii.Error, ValueError):
        return b""


def map_error(response: httpx.Response) -> GatewayError:
    """The one translation of an OpenAI error envelope `{"error": {message, type, param, code}}`.

    400/422 -> InvalidRequest keeping `param` and `code` (ContentPolicyViolation for moderation_blocked /
               content_policy_violation; InsufficientCredit for billing codes)
    401/403 -> UpstreamAuthFailed 502 (the upstream's message is dropped: it may quote the key)
    404     -> UpstreamError (e.g. model_not_found: a route configuration problem), fallback
    413     -> PayloadTooLarge
    429     -> RateLimited with retry-after (retryable unless `x-should-retry: false`), or InsufficientCredit
               for insufficient_quota
    5xx     -> 503 ProviderUnavailable (retryable), other 5xx UpstreamError (not retryable: the work may
               have been done); `x-should-retry` overrides; both allow fallback
    """
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = {}
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else (body if isinstance(body, dict) else {})
    message = upstream_text(_text(error.get("message")) or _text(error.get("detail")) or response.reason_phrase)
    message = message or upstream_text(response.text) or f"HTTP {status}"
    param = upstream_token(_text(error.get("param")))
    code = upstream_token(_text(error.get("code")))
    kind = _text(error.get("type"))
    retry_after = retry_after_seconds(response.headers)
    should_retry = response.headers.get("x-should-retry", "").strip().lower()
    if status in (401, 403):
        return UpstreamAuthFailed(
            f"The upstream rejected the configured API key (HTTP {status}{', ' + code if code else ''}).",
            retryable=False,
        )
    if code in _BILLING_CODES or kind == "insufficient_quota":
        return InsufficientCredit(f"Upstream: {message}", code=code, retryable=False, fallback=True)
    if status == 429:  # `x-should-retry: false` (e.g. another imagegate): the upstream had taken the job
        taken = should_retry == "false"
        return RateLimited(f"Upstream rate limit: {message}", retry_after=retry_after, retryable=not taken,
                           accepted=taken)
    if status in (400, 422):
        if code in _CONTENT_POLICY_CODES or kind == "image_generation_user_error":
            return ContentPolicyViolation(message, param=param, code=code)
        return InvalidRequest(message, param=param, code=code)
    if status == 413:
        return PayloadTooLarge(message, param=param)
    if status >= 500:
        retryable = should_retry == "true" if should_retry in ("true", "false") else status == 503
        # The upstream may have made the image before failing, unless it says a retry is safe.
        if status == 503:
            return ProviderUnavailable(f"Upstream unavailable: {message}", retryable=retryable, retry_after=retry_after,
                                       accepted=not retryable)
        return UpstreamError(f"Upstream error (HTTP {status}): {message}", retryable=retryable, accepted=not retryable)
    return UpstreamError(f"Upstream answered HTTP {status}: {message}")


class OpenAITransport:
    """The Images API calls, on the gateway's shared client."""

    def __init__(self, http: httpx.AsyncClient, *, base_url: str, api_key: str) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key

    async def call(self, request: UpstreamCall, *, deadline: float, output_format: str | None) -> ProviderResult:
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}
        timeout = httpx.Timeout(max(1.0, deadline - time.monotonic()), connect=CONNECT_TIMEOUT)
        url = self.base_url + request.path
        try:
            if request.json is not None:
                response = await self.http.post(url, json=request.json, headers=headers, timeout=timeout)
            else:
                response = await self.http.post(
                    url, data=request.data, files=request.files, headers=headers, timeout=timeout
                )
        except httpx.HTTPError as exc:
            # Once the body may have been sent, the image may be made (and billed): not retryable.
            # Only a failure to connect proves the upstream never saw it.
            raise transport_error(PROVIDER, exc, accepted=not never_sent(exc)) from None
        if not response.is_success:
            raise map_error(response)
        try:
            body = response.json()
        except ValueError:
            raise UpstreamError("The upstream answered with a body that is not JSON.", accepted=True) from None
        try:
            images, revised = parse_images(body, output_format=output_format)
        except UpstreamError as exc:
            exc.accepted = True  # a 2xx answer: the work was done
            raise
        return ProviderResult(images=images, request_id=response.headers.get("x-request-id"), revised_prompt=revised)


async def download_output(http: httpx.AsyncClient, url: str, *, max_bytes: int) -> bytes:
    """GET an output URL (dall-e's signed blob URLs need no key: none is sent), following redirects,
    retrying transient failures, streamed and capped at `max_bytes`."""

    def failed(response: httpx.Response) -> GatewayError:
        return UpstreamError(f"Could not download the upstream's output image (HTTP {response.status_code}).")

    return await download(
        http,
        url,
        provider=PROVIDER,
        max_bytes=max_bytes,
        max_redirects=MAX_REDIRECTS,
        attempts=DOWNLOAD_ATTEMPTS,
        on_status=failed,
    )


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""
