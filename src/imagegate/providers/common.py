"""Protocol helpers shared by the HTTP adapters: Retry-After, backoff, polling cadence,
data URIs, transport-error mapping, idempotent GETs with retry, capped output downloads,
best-effort cleanup."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import httpx

from imagegate.core.errors import GatewayError, ProviderUnavailable, UpstreamError, UpstreamTimeout
from imagegate.core.fetch import read_capped
from imagegate.upstream_plain import plain_origin

__all__ = [
    "backoff_delay",
    "best_effort",
    "data_uri_mime",
    "decode_data_uri",
    "download",
    "get_with_retry",
    "never_sent",
    "on_origins",
    "poll_delays",
    "retry_after_seconds",
    "transport_error",
]

RETRYABLE_GET_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_REDIRECTS = 5
ERROR_BODY_BYTES = 64 * 1024  # enough of an error body to map it; the rest is not read
_DATA_URI_HEADER_CHARS = 512


def retry_after_seconds(headers: Mapping[str, str], body_value: Any = None) -> float | None:
    """`retry-after-ms`, then `Retry-After` (seconds or an HTTP date), then a body value (seconds)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    if (value := headers.get("retry-after")) is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    if isinstance(body_value, int | float) and not isinstance(body_value, bool):
        return max(0.0, float(body_value))
    return None


def backoff_delay(attempt: int, *, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff with jitter in [0.75, 1] (attempt 0 is the first retry); Retry-After wins."""
    if retry_after is not None:
        return retry_after
    return min(cap, base * 2.0**attempt) * random.uniform(0.75, 1.0)


def poll_delays(*, start: float, cap: float, factor: float = 1.5) -> AsyncIterator[int]:
    """Sleep between polls with a growing, capped interval; yields the poll number (0 at once).
    An iterator object, not an async generator: a loop that returns mid-way leaves no generator for
    the event loop to close in a task of its own (two extra tasks per fal job otherwise)."""
    return _PollDelays(start, cap, factor)


class _PollDelays:
    def __init__(self, start: float, cap: float, factor: float) -> None:
        self._delay = start
        self._cap = cap
        self._factor = factor
        self._number = 0

    def __aiter__(self) -> _PollDelays:
        return self

    async def __anext__(self) -> int:
        if self._number:
            # wide jitter: jobs that start together spread out
            await asyncio.sleep(self._delay * random.uniform(0.75, 1.25))
            self._delay = min(self._cap, self._delay * self._factor)
        number = self._number
        self._number += 1
        return number


def decode_data_uri(uri: str) -> tuple[bytes, str]:
    """`data:<mime>;base64,<b64>` -> (bytes, mime)."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise UpstreamError("The provider returned a malformed data URI.")
    try:
        return base64.b64decode(payload, validate=True), header[5:-7] or "application/octet-stream"
    except (binascii.Error, ValueError):
        raise UpstreamError("The provider returned a data URI that is not valid base64.") from None


def data_uri_mime(uri: str) -> str:
    """The media type of a `data:<mime>;base64,...` URI, checking only its header (cheap: the
    payload is decoded later, in the image pool). Malformed -> UpstreamError."""
    comma = uri.find(",", 0, _DATA_URI_HEADER_CHARS)
    header = uri[:comma]
    if comma < 0 or not header.startswith("data:") or not header.endswith(";base64"):
        raise UpstreamError("The provider returned a malformed data URI.")
    return header[5:-7] or "application/octet-stream"


def never_sent(exc: httpx.HTTPError) -> bool:
    """True when the request cannot have reached the upstream (no connection was made), so
    sending it again cannot create a second job. For the submit/create call only."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def transport_error(provider: str, exc: httpx.HTTPError, *, accepted: bool) -> GatewayError:
    """Map an httpx failure. `accepted` says whether the upstream may already have taken the job
    (it becomes the error's `accepted`): then no error is retryable (the service's retry is a NEW
    submit and could bill twice). Only the submit/create call may pass `accepted=False`, and only
    when the failure proves nothing was sent (`never_sent`) or the call bills nothing (uploads)."""
    retryable = not accepted
    error: GatewayError
    if isinstance(exc, httpx.TimeoutException):
        if isinstance(exc, httpx.ConnectTimeout):
            error = ProviderUnavailable(f"Could not connect to {provider} (timeout).", retryable=retryable)
        else:
            error = UpstreamTimeout(f"{provider} did not answer in time.", retryable=retryable)
    elif isinstance(exc, httpx.ConnectError):
        error = ProviderUnavailable(f"Could not connect to {provider}.", retryable=retryable)
    else:
        error = ProviderUnavailable(f"Connection to {provider} failed: {type(exc).__name__}.", retryable=retryable)
    error.accepted = accepted
    return error


def on_origins(url: str, origins: Iterable[str]) -> bool:
    """Is `url` on one of `origins` (scheme, host and port compared; each origin given as a URL)?
    Credentials go only to the hosts the operator configured."""
    try:
        allowed = _origin_set(tuple(origins))
        if (origin := plain_origin(url)) is not None:  # most URLs: what httpx.URL would say, cheaply
            return origin in allowed
        target = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    return bool(target.host) and (target.scheme, target.host.lower(), target.port) in allowed


@functools.lru_cache(maxsize=64)
def _origin_set(origins: tuple[str, ...]) -> frozenset[tuple[str, str, int | None]]:
    """The configured origins, parsed once (they are checked on every upstream URL: hot path)."""
    return frozenset((u.scheme, u.host.lower(), u.port) for u in (httpx.URL(origin) for origin in origins))


async def get_with_retry(
    http: httpx.AsyncClient,
    url: str,
    *,
    provider: str,
    headers: Mapping[str, str] | None = None,
    attempts: int = 5,
    base: float = 0.25,
    cap: float = 4.0,
    params: Mapping[str, str] | None = None,
) -> httpx.Response:
    """GET an idempotent URL, retrying connection errors, 408/409/429/5xx with backoff.
    Returns the last response (whatever its status) once retries are spent or it is final."""
    last_exc: httpx.HTTPError | None = None
    for attempt in range(attempts):
        try:
            response = await http.get(url, headers=headers, params=params)
        except httpx.InvalidURL:
            raise UpstreamError(f"{provider} returned a URL the gateway cannot use.") from None
        except httpx.HTTPError as exc:
            last_exc = exc
            await asyncio.sleep(backoff_delay(attempt, base=base, cap=cap))
            continue
        if response.status_code not in RETRYABLE_GET_STATUSES or attempt == attempts - 1:
            return response
        await asyncio.sleep(
            backoff_delay(attempt, base=base, cap=cap, retry_after=retry_after_seconds(response.headers))
        )
    assert last_exc is not None
    raise transport_error(provider, last_exc, accepted=True)


async def download(
    http: httpx.AsyncClient,
    url: str,
    *,
    provider: str,
    max_bytes: int,
    headers: Mapping[str, str] | None = None,
    headers_for: Callable[[str], Mapping[str, str] | None] | None = None,
    timeout: float | httpx.Timeout | None = None,
    follow_redirects: bool = True,
    max_redirects: int = MAX_REDIRECTS,
    attempts: int = 1,
    on_status: Callable[[httpx.Response], GatewayError] | None = None,
) -> bytes:
    """GET a provider's output, streamed and capped at `max_bytes` (Content-Length checked first,
    then counted while reading; over it -> UpstreamError, the rest is never read).

    Redirects are followed hop by hop (at most `max_redirects`); `headers_for(url)`, when given,
    picks each hop's headers (e.g. a token only for the provider's own hosts), else `headers` go to
    every hop. With `attempts` > 1, connection failures and transient statuses (408/409/425/429/5xx)
    are retried with backoff (a GET is idempotent). A final error status -> `on_status(response)`
    (the response holds at most the first 64 KiB of the body) or UpstreamError; httpx failures ->
    `transport_error(accepted=True)` (never retryable: the job that made this output was billed)."""
    request_timeout: Any = httpx.USE_CLIENT_DEFAULT if timeout is None else timeout
    redirects = 0
    attempt = 0
    while True:
        hop_headers = headers_for(url) if headers_for is not None else headers
        try:
            outcome = await _download_hop(http, url, hop_headers, request_timeout, provider, max_bytes,
                                          follow_redirects)
        except httpx.InvalidURL:
            raise UpstreamError(f"{provider} returned an output URL the gateway cannot use.") from None
        except httpx.HTTPError as exc:
            attempt += 1
            if attempt >= attempts:
                raise transport_error(provider, exc, accepted=True) from exc
            await asyncio.sleep(backoff_delay(attempt - 1, base=0.25, cap=4.0))
            continue
        if isinstance(outcome, bytes):
            return outcome
        if isinstance(outcome, str):  # a redirect's absolute Location
            redirects += 1
            if redirects > max_redirects:
                raise UpstreamError(f"The {provider} output URL redirected too many times.")
            url = outcome
            continue
        attempt += 1
        if outcome.status_code in RETRYABLE_GET_STATUSES and attempt < attempts:
            retry_after = retry_after_seconds(outcome.headers)
            await asyncio.sleep(backoff_delay(attempt - 1, base=0.25, cap=4.0, retry_after=retry_after))
            continue
        if on_status is not None:
            raise on_status(outcome)
        raise UpstreamError(f"Could not download the {provider} output image (HTTP {outcome.status_code}).")


async def _download_hop(
    http: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str] | None,
    timeout: Any,
    provider: str,
    max_bytes: int,
    follow_redirects: bool,
) -> bytes | str | httpx.Response:
    """One GET: the body (bytes), a redirect's absolute Location (str), or a failed response
    (with at most ERROR_BODY_BYTES of its body read)."""
    async with http.stream("GET", url, headers=headers, timeout=timeout, follow_redirects=False) as response:
        location = response.headers.get("location")
        if follow_redirects and response.is_redirect and location:
            return str(response.url.join(location))
        if not response.is_success:
            return await _error_response(response)
        too_large = UpstreamError(f"The {provider} output was larger than the limit of {max_bytes} bytes.")
        return await read_capped(response, max_bytes, too_large)


async def _error_response(response: httpx.Response) -> httpx.Response:
    """A copy of a failed streamed response holding at most ERROR_BODY_BYTES of its (decoded) body."""
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        pass  # what was read is enough to map the status
    skip = {"content-encoding", "content-length", "transfer-encoding"}
    kept = [(key, value) for key, value in response.headers.multi_items() if key.lower() not in skip]
    return httpx.Response(
        response.status_code, headers=kept, content=bytes(body[:ERROR_BODY_BYTES]), request=response.request
    )


async def best_effort(awaitable: Awaitable[Any], *, timeout: float = 5.0) -> None:
    """Run cleanup (an upstream cancel) to completion even if the caller is being cancelled;
    swallow its failures. Use from an `except BaseException:` block before re-raising."""
    task = asyncio.ensure_future(awaitable)
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(asyncio.shield(task), timeout)
