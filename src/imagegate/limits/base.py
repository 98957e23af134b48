"""The limiter interface and what both implementations share: the decision, the headers, the 429.

Windows are sliding: `rpm` admits a request when fewer than `rpm` requests were admitted in the
last 60 seconds; `images_per_minute` counts each request's `n`. `max_concurrent` counts requests
between admission and the end of the block. All three are checked and taken together (a request
refused by one limit consumes nothing from the others).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from imagegate.auth.keys import KeyLimits
from imagegate.core.errors import RateLimited

__all__ = ["WINDOW_SECONDS", "Admission", "Decision", "Limiter", "RateLimitExceeded", "format_reset"]

log = logging.getLogger("imagegate.limits")
WINDOW_SECONDS = 60.0
_cleanups: set[asyncio.Future[None]] = set()  # releases that outlive a cancelled caller
Refusal = Literal["requests", "images", "concurrency", "too_many_images"]


class RateLimitExceeded(RateLimited):
    """429 `rate_limit_exceeded`; `extra_headers` carries the `x-ratelimit-*` headers."""

    def __init__(self, message: str, *, retry_after: float | None, headers: dict[str, str]) -> None:
        super().__init__(message, retry_after=retry_after)
        self.extra_headers = headers


@dataclass(frozen=True, slots=True)
class Decision:
    refused: Refusal | None
    requests: int = 0  # admitted in the window (after this one, when admitted)
    images: int = 0
    reset_requests: float = 0.0  # seconds until the oldest counted request leaves the window
    reset_images: float = 0.0
    retry_after: float = 0.0


@dataclass(slots=True)
class Admission:
    """An admitted request: the `x-ratelimit-*` headers for its response."""

    headers: dict[str, str] = field(default_factory=dict)


def format_reset(seconds: float) -> str:
    """OpenAI's reset duration: `20ms`, `1s`, `12.5s`, `1m0s`."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def rate_headers(limits: KeyLimits, decision: Decision) -> dict[str, str]:
    headers: dict[str, str] = {}
    if limits.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - decision.requests))
        headers["x-ratelimit-reset-requests"] = format_reset(decision.reset_requests)
    if limits.images_per_minute is not None:
        headers["x-ratelimit-limit-images"] = str(limits.images_per_minute)
        headers["x-ratelimit-remaining-images"] = str(max(0, limits.images_per_minute - decision.images))
        headers["x-ratelimit-reset-images"] = format_reset(decision.reset_images)
    return headers


def _refusal(name: str, limits: KeyLimits, images: int, decision: Decision) -> RateLimitExceeded:
    headers = rate_headers(limits, decision)
    retry_after: float | None = max(1.0, decision.retry_after)
    if decision.refused == "requests":
        message = f"Rate limit reached for key '{name}': {limits.rpm} requests per minute."
    elif decision.refused == "images":
        message = f"Rate limit reached for key '{name}': {limits.images_per_minute} images per minute."
    elif decision.refused == "concurrency":
        message = f"Rate limit reached for key '{name}': {limits.max_concurrent} requests in flight at once."
    else:
        message = (
            f"Request too large for key '{name}': {images} images requested, "
            f"the limit is {limits.images_per_minute} images per minute."
        )
        headers["x-should-retry"] = "false"
        retry_after = None
    return RateLimitExceeded(message, retry_after=retry_after, headers=headers)


def refuse_unadmittable(name: str, limits: KeyLimits, images: int) -> None:
    """Raise the refusal `admit` gives a request no window can ever admit (more images than the
    key's `images_per_minute`), without taking anything: an async job is refused so at submit."""
    if limits.images_per_minute is not None and images > limits.images_per_minute:
        raise _refusal(name, limits, images, Decision("too_many_images"))


class Limiter(abc.ABC):
    """Admits requests per key name. Subclasses implement the atomic check-and-take."""

    lease_seconds: float = 30.0  # a concurrency slot's lease (renewed while held; Redis only)

    @abc.abstractmethod
    async def _acquire(self, name: str, limits: KeyLimits, images: int, token: str) -> Decision:
        """Check every limit and, if all pass, take from each (atomically)."""

    @abc.abstractmethod
    async def _release(self, name: str, token: str) -> None:
        """Give back the concurrency slot `token` holds."""

    async def _renew(self, name: str, token: str) -> None:  # noqa: B027 - only leased slots renew
        """Extend the lease of the slot `token` holds."""

    @contextlib.asynccontextmanager
    async def admit(self, name: str, limits: KeyLimits, images: int) -> AsyncIterator[Admission]:
        if not limits:
            yield Admission()
            return
        token = uuid.uuid4().hex
        # Shielded: a caller cancelled while the acquire is in flight must not leak the slot the
        # acquire may already have taken; it is given back as soon as the acquire returns.
        acquiring = asyncio.ensure_future(self._acquire(name, limits, images, token))
        try:
            decision = await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            cleanup = asyncio.ensure_future(self._release_when_acquired(name, token, acquiring))
            _cleanups.add(cleanup)
            cleanup.add_done_callback(_cleanups.discard)
            raise
        if decision.refused is not None:
            raise _refusal(name, limits, images, decision)
        if limits.max_concurrent is None:
            yield Admission(rate_headers(limits, decision))
            return
        renewer = asyncio.create_task(self._keep_lease(name, token))
        try:
            yield Admission(rate_headers(limits, decision))
        finally:  # success, error, client disconnect, cancellation
            renewer.cancel()
            try:
                await asyncio.shield(self._release(name, token))
            except Exception:  # the lease expires on its own
                log.warning("could not release a concurrency slot of key %s; its lease will expire", name)

    async def _release_when_acquired(self, name: str, token: str, acquiring: asyncio.Future[Decision]) -> None:
        try:
            decision = await acquiring
            if decision.refused is None:
                await self._release(name, token)
        except Exception:  # the lease expires on its own
            log.warning("could not release a concurrency slot of key %s; its lease will expire", name)

    async def _keep_lease(self, name: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self._renew(name, token)
            except Exception:
                log.warning("could not renew a concurrency slot of key %s", name)
