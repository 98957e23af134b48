"""Replicate's HTTP protocol (see docs/reference: replicate-protocol.md), with plain httpx.

    create    POST {base}/models/{owner}/{name}/predictions   {"input": {...}}
              (or POST {base}/predictions {"version", "input"} for a pinned `owner/name:version`)
              headers: Authorization: Bearer <token>, Prefer: wait=N, Cancel-After: <deadline>s
    poll      GET  urls.get until the prediction is done (backoff, idempotent retries); an async job
              sees its `status` and the tail of its `logs` as progress
    cancel    POST urls.cancel (best effort)
    upload    POST {base}/files (multipart `content` + `metadata`) -> urls.get, for large inputs
    download  GET  output URLs; the Bearer token goes only to Replicate hosts

A prediction is done when its status is terminal (succeeded, failed, canceled, aborted) or
when it is `processing` with a non-empty `output` (sync mode returns as soon as the files
exist). Every upstream failure is translated by the one function `errors.map_error`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import quote

import httpx

from imagegate.core.errors import UpstreamError, UpstreamTimeout
from imagegate.core.redact import upstream_text
from imagegate.core.request import FORMAT_MIME, InputImage
from imagegate.providers.base import ProviderImage
from imagegate.providers.common import (
    data_uri_mime,
    download,
    get_with_retry,
    never_sent,
    poll_delays,
    transport_error,
)
from imagegate.providers.progress import ChangedReports, OnProgress, log_tail, progress_report
from imagegate.providers.replicate.errors import json_object, map_error
from imagegate.providers.replicate.prediction import Prediction

__all__ = [
    "ReplicateTransport",
    "cancel_after_header",
    "is_replicate_url",
    "output_images",
    "prefer_wait_seconds",
    "status_progress",
]

PROVIDER = "replicate"
READ_MARGIN = 5.0  # the create's read timeout is Prefer's wait plus this
CONNECT_TIMEOUT = 10.0
CANCEL_TIMEOUT = 5.0
UPLOAD_TIMEOUT = 120.0
MIN_CANCEL_AFTER = 5  # seconds; Replicate's minimum
MAX_WAIT = 60  # seconds; `Prefer: wait=N` accepts 1..60
MAX_REDIRECTS = 5
DOWNLOAD_ATTEMPTS = 5  # as get_with_retry: an output GET is idempotent
FILE_EXTENSIONS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp", "gif": "gif", "avif": "avif"}
# Hosts that may receive the token, besides the configured base_url's origin.
REPLICATE_HOSTS = frozenset({"api.replicate.com", "replicate.delivery"})
REPLICATE_HOST_SUFFIXES = (".replicate.delivery",)
_EXTENSION_MIME = {f".{ext}": FORMAT_MIME[fmt] for ext, fmt in FILE_EXTENSIONS.items()}


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


def status_progress(prediction: Prediction) -> dict[str, Any]:
    """A running prediction, for an async job's progress: its `status` (starting, processing) and
    the last lines of its `logs` text, redacted and capped (`providers.progress`)."""
    return progress_report(prediction.data.get("status"), log_tail(prediction.data.get("logs")))


def output_images(prediction: Prediction) -> list[ProviderImage]:
    """`output` as a list (a single string is wrapped): `data:` URIs kept as URLs (only the header
    is checked; the payload is decoded in the image pool at delivery, never on the event loop),
    http(s) URLs kept (content type from the extension when evident). Empty -> map_error's error."""
    output = prediction.data.get("output")
    items = [output] if isinstance(output, str) else output if isinstance(output, list) else []
    images: list[ProviderImage] = []
    for item in items:
        if not isinstance(item, str) or not item:
            shown = upstream_text(str(item), limit=100)
            raise UpstreamError(f"Replicate returned an output that is not a file: {shown!r}.")
        if item.startswith("data:"):
            images.append(ProviderImage(url=item, content_type=data_uri_mime(item)))
        elif item.startswith(("https://", "http://")):
            path = httpx.URL(item).path.lower()
            evident = next((m for ext, m in _EXTENSION_MIME.items() if path.endswith(ext)), None)
            images.append(ProviderImage(url=item, content_type=evident))
        else:
            raise UpstreamError(f"Replicate returned an output that is not a file: {upstream_text(item, limit=100)!r}.")
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
            # Once the body may have been sent, the prediction may exist (a resubmit could bill
            # twice); only a failure to connect proves Replicate never saw it.
            raise transport_error(PROVIDER, exc, accepted=not never_sent(exc)) from None
        if not response.is_success:
            raise map_error(response, stage="create")
        try:
            return Prediction(_prediction_body(response))
        except UpstreamError as exc:
            exc.accepted = True  # a 2xx create: the prediction may exist
            raise

    async def wait(
        self, prediction: Prediction, *, deadline: float, on_progress: OnProgress | None = None
    ) -> Prediction:
        """Poll `urls.get` with a growing interval until done; updates `prediction` in place.
        Raises map_error's error for failed/canceled/aborted, UpstreamTimeout past the deadline.
        `on_progress` gets each changed report of a prediction still running (`status_progress`)."""
        reports = ChangedReports(on_progress) if on_progress is not None else None
        async for number in poll_delays(start=self.poll_interval, cap=self.poll_max_interval):
            if number:
                response = await get_with_retry(
                    self.http,
                    self._own_url(prediction, "get"),
                    provider=PROVIDER,
                    headers=self._auth(),
                    base=self.poll_interval,
                    cap=self.poll_max_interval,
                )
                if not response.is_success:
                    raise map_error(response, stage="poll")
                prediction.data = _prediction_body(response)
            if reports is not None and prediction.status and not prediction.done:  # (a resumed one: not yet polled)
                await reports.send(status_progress(prediction))
            if prediction.done:
                if prediction.status in ("failed", "canceled", "aborted"):
                    raise map_error(prediction)
                return prediction
            if time.monotonic() >= deadline:
                raise UpstreamTimeout("The Replicate prediction did not finish before the gateway's deadline.")
        raise AssertionError("poll_delays never ends")  # pragma: no cover

    async def cancel(self, prediction: Prediction) -> None:
        """POST `urls.cancel`; failures are the caller's to ignore (use `best_effort`)."""
        await self.http.post(self._own_url(prediction, "cancel"), headers=self._auth(), timeout=CANCEL_TIMEOUT)

    def _own_url(self, prediction: Prediction, name: Literal["get", "cancel"]) -> str:
        """`urls.get` / `urls.cancel` when they are Replicate's, else the canonical URL on the
        configured base_url: the token never goes to another host."""
        url = prediction.url(name, self.base_url)
        if is_replicate_url(url, self.base_url):
            return url
        return f"{self.base_url}/predictions/{quote(prediction.id, safe='')}" + ("/cancel" if name == "cancel" else "")

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
        urls = json_object(response).get("urls")
        url = urls.get("get") if isinstance(urls, dict) else None
        if not isinstance(url, str) or not url:
            raise UpstreamError("Replicate's Files API answered without `urls.get`.")
        return url

    async def download(self, url: str, *, max_bytes: int) -> bytes:
        """GET an output file, streamed and capped at `max_bytes`, following redirects and retrying
        transient failures; the token is decided per hop: sent only to Replicate hosts."""
        return await download(
            self.http,
            url,
            provider=PROVIDER,
            max_bytes=max_bytes,
            headers_for=lambda hop: self._auth() if is_replicate_url(hop, self.base_url) else None,
            max_redirects=MAX_REDIRECTS,
            attempts=DOWNLOAD_ATTEMPTS,
            on_status=lambda response: map_error(response, stage="download"),
        )


def _prediction_body(response: httpx.Response) -> dict[str, Any]:
    body = json_object(response)
    if not body.get("id") or not isinstance(body.get("status"), str):
        raise UpstreamError("Replicate answered with something that is not a prediction.")
    return body
