"""What one request did, recorded as it happens, for metrics and the request log.

The HTTP layer opens a `RequestTelemetry` per request (`begin`/`end`, a context variable, so
tasks and image-pool threads started by the request record into the same object). Core code
reports through the functions below, which do nothing outside a request:

    note_request(model=, operation=, prompt=)   the catalog model being served (never an unknown id)
    upstream_call(provider)                     context manager: one provider call, timed, with its outcome
    note_retry(provider) / note_fallback(model) a retry within a route / a move to the next route
    note_images(provider, count)                images delivered by the route that succeeded
    postprocess(op)                             context manager: gateway image work (transform, base64, store)

Outcomes are bounded: `success`, `cancelled`, the error class's code (e.g. `upstream_timeout`),
or `error`.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PostprocessStep",
    "RequestTelemetry",
    "UpstreamCall",
    "begin",
    "current",
    "end",
    "note_fallback",
    "note_images",
    "note_request",
    "note_retry",
    "outcome_of",
    "postprocess",
    "upstream_call",
]


@dataclass(slots=True)
class UpstreamCall:
    provider: str
    outcome: str
    started: float  # time.monotonic()
    ended: float

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass(slots=True)
class PostprocessStep:
    op: str
    seconds: float


@dataclass(slots=True)
class RequestTelemetry:
    state: dict[str, Any] = field(default_factory=dict)  # the request's scope state (request id, key name)
    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    operation: str | None = None
    prompt: str | None = None
    provider: str | None = None  # the provider whose images were delivered
    images: int = 0
    upstream: list[UpstreamCall] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)  # provider per retry
    fallbacks: list[str] = field(default_factory=list)  # model per move to the next route
    steps: list[PostprocessStep] = field(default_factory=list)

    def upstream_seconds(self) -> float:
        """Wall-clock time with at least one upstream call running (parallel calls overlap)."""
        total, end = 0.0, float("-inf")
        for call in sorted(self.upstream, key=lambda c: c.started):
            if call.ended <= end:
                continue
            total += call.ended - max(call.started, end)
            end = call.ended
        return total

    def postprocess_seconds(self) -> float:
        """Gateway image work, summed over steps (steps for several images may run in parallel)."""
        return sum(step.seconds for step in self.steps)


_current: contextvars.ContextVar[RequestTelemetry | None] = contextvars.ContextVar(
    "imagegate_request_telemetry", default=None
)


def begin(state: dict[str, Any] | None = None) -> tuple[RequestTelemetry, contextvars.Token[RequestTelemetry | None]]:
    telemetry = RequestTelemetry(state={} if state is None else state)
    return telemetry, _current.set(telemetry)


def end(token: contextvars.Token[RequestTelemetry | None]) -> None:
    _current.reset(token)


def current() -> RequestTelemetry | None:
    return _current.get()


def note_request(*, model: str, operation: str, prompt: str | None) -> None:
    if (telemetry := _current.get()) is not None:
        telemetry.model, telemetry.operation, telemetry.prompt = model, operation, prompt


def note_retry(provider: str) -> None:
    if (telemetry := _current.get()) is not None:
        telemetry.retries.append(provider)


def note_fallback(model: str) -> None:
    if (telemetry := _current.get()) is not None:
        telemetry.fallbacks.append(model)


def note_images(provider: str, count: int) -> None:
    if (telemetry := _current.get()) is not None:
        telemetry.provider = provider
        telemetry.images += count


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return "success"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    code = getattr(type(exc), "code", None)  # the class's code: instance codes are not a bounded set
    return code if isinstance(code, str) and code else "error"


class upstream_call:  # lower case: used as the function it was, `with upstream_call(provider):`
    """Context manager: one provider call, timed, recorded with its outcome in the request's
    telemetry (a class, not a generator: it wraps every upstream call)."""

    __slots__ = ("_provider", "_started", "_telemetry")

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self._telemetry = _current.get()
        self._started = time.monotonic()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        if self._telemetry is not None:
            self._telemetry.upstream.append(
                UpstreamCall(self._provider, outcome_of(error), self._started, time.monotonic())
            )


@contextmanager
def postprocess(op: str) -> Iterator[None]:
    telemetry = _current.get()
    started = time.perf_counter()
    try:
        yield
    finally:
        if telemetry is not None:
            telemetry.steps.append(PostprocessStep(op, time.perf_counter() - started))
