"""Protocol helpers shared by the HTTP adapters: Retry-After, backoff, polling cadence,
data URIs, transport-error mapping, idempotent GETs with retry, best-effort cleanup."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import random
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import httpx

from imagegate.core.errors import GatewayError, ProviderUnavailable, UpstreamError, UpstreamTimeout

__all__ = [
    "backoff_delay",
    "best_effort",
    "decode_data_uri",
    "get_with_retry",
    "poll_delays",
    "retry_after_seconds",
    "transport_error",
]

RETRYABLE_GET_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


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


async def poll_delays(*, start: float, cap: float, factor: float = 1.5) -> AsyncIterator[int]:
    """Sleep between polls with a growing, capped interval; yields the poll number."""
    delay = start
    number = 0
    while True:
        yield number
        number += 1
        await asyncio.sleep(delay * random.uniform(0.9, 1.1))
        delay = min(cap, delay * factor)


def decode_data_uri(uri: str) -> tuple[bytes, str]:
    """`data:<mime>;base64,<b64>` -> (bytes, mime)."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise UpstreamError("The provider returned a malformed data URI.")
    try:
        return base64.b64decode(payload, validate=True), header[5:-7] or "application/octet-stream"
    except (binascii.Error, ValueError):
        raise UpstreamError("The provider returned a data URI that is not valid base64.") from None


def transport_error(provider: str, exc: httpx.HTTPError, *, accepted: bool) -> GatewayError:
    """Map an httpx failure. `accepted` says whether the upstream may already have taken the job
    (then a resubmit could bill twice, so the error is not retryable, only a fallback candidate)."""
    if isinstance(exc, httpx.TimeoutException):
        if isinstance(exc, httpx.ConnectTimeout):
            return ProviderUnavailable(f"Could not connect to {provider} (timeout).")
        return UpstreamTimeout(f"{provider} did not answer in time.", retryable=not accepted)
    if isinstance(exc, httpx.ConnectError):
        return ProviderUnavailable(f"Could not connect to {provider}.")
    return ProviderUnavailable(f"Connection to {provider} failed: {type(exc).__name__}.", retryable=not accepted)


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


async def best_effort(awaitable: Awaitable[Any], *, timeout: float = 5.0) -> None:
    """Run cleanup (an upstream cancel) to completion even if the caller is being cancelled;
    swallow its failures. Use from an `except BaseException:` block before re-raising."""
    task = asyncio.ensure_future(awaitable)
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(asyncio.shield(task), timeout)
