"""Resumable upstream calls: how an adapter reports an accepted upstream job, and picks it up again.

An async job (`imagegate.jobs`) runs the ordinary service with `UpstreamHooks` set in the context
(`active_hooks`); `CallContext.hooks` reads it when the service builds the context of each call.
An adapter that can resume (fal's queue, Replicate's predictions) wraps each upstream call in
`hooks.call(provider, model, payload)`:

- `call.handle` is the small JSON handle of an upstream job this job already submitted for the
  same call (after a restart): the adapter polls that job instead of submitting again;
- otherwise it submits and, as soon as the upstream answers with an id, awaits
  `call.accepted(handle)`, which persists the handle before anything else happens.

A call is known by its provider, upstream model and payload (input image references, which
change between runs for uploaded files, are left out) plus its occurrence among identical calls
(an emulated `n` fans out identical payloads). `detached` is set when the worker stops without
the job being cancelled (shutdown): adapters then leave the upstream job running, for the next
worker to resume. Before a call without a handle submits, `guard()` (the job runner's) checks that
the job is still this worker's: a worker back from a pause longer than its lease, whose job another
worker took meanwhile, stops there instead of submitting it a second time. `call.progress(info)`
reports what the upstream says of a running job (fal: its status, queue position and last log
lines; Replicate: the prediction's status and last log lines; see `providers.progress`); the job
shows it and emits an `in_progress` event.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from imagegate.core.errors import UpstreamError

__all__ = ["UpstreamCall", "UpstreamHooks", "active_hooks", "current_hooks", "unresumable_call"]

Handle = dict[str, Any]
Persist = Callable[[str, Handle], Awaitable[None]]
Progress = Callable[[dict[str, Any]], Awaitable[None]]
Guard = Callable[[], Awaitable[None]]

active_hooks: contextvars.ContextVar[UpstreamHooks | None] = contextvars.ContextVar(
    "imagegate_upstream_hooks", default=None
)


def current_hooks() -> UpstreamHooks | None:
    """The hooks of the async job running in this context (None for a synchronous request)."""
    return active_hooks.get()


@dataclass(slots=True)
class UpstreamCall:
    key: str
    provider: str
    model: str
    handle: Handle | None
    _hooks: UpstreamHooks

    async def accepted(self, handle: Mapping[str, Any]) -> None:
        """The upstream took the job: persist `handle` (JSON-serialisable; its `request_id` is shown
        on the job) before going on. The route (`provider:model`) is recorded with it."""
        stored = {**handle, "provider": self.provider, "route": f"{self.provider}:{self.model}"}
        self._hooks.handles[self.key] = stored
        await self._hooks.persist(self.key, stored)

    async def progress(self, info: dict[str, Any]) -> None:
        """The upstream's report on the running job (`{status, queue_position, logs}`), already redacted."""
        if self._hooks.progress is not None:
            await self._hooks.progress(info)

    @property
    def detached(self) -> bool:
        return self._hooks.detached


@dataclass(slots=True)
class UpstreamHooks:
    handles: dict[str, Handle]  # call key -> handle of the upstream job
    persist: Persist
    progress: Progress | None = None
    guard: Guard | None = None  # awaited before a submit: raises if the job is no longer this worker's
    detached: bool = False
    _running: set[str] = field(default_factory=set)

    @asynccontextmanager
    async def call(self, provider: str, model: str, payload: Mapping[str, Any]) -> AsyncIterator[UpstreamCall]:
        base = f"{provider}:{model}:{_fingerprint(payload)}"
        index = 0
        while f"{base}#{index}" in self._running:  # an identical call of the same fan-out is running
            index += 1
        key = f"{base}#{index}"
        handle = self.handles.get(key)
        if handle is None and self.guard is not None:
            await self.guard()  # a worker that lost the job (paused past its lease) submits nothing
        self._running.add(key)
        try:
            yield UpstreamCall(key, provider, model, handle, self)
        finally:
            if key not in self.handles:  # a call the upstream took keeps its key for good
                self._running.discard(key)


def _fingerprint(payload: Mapping[str, Any]) -> str:
    text = json.dumps(_without_refs(payload), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _without_refs(value: Any) -> Any:
    if isinstance(value, str) and value[:5].lower() in ("data:", "http:", "https"):
        return "<ref>"
    if isinstance(value, Mapping):
        return {str(k): _without_refs(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_refs(v) for v in value]
    return value


@asynccontextmanager
async def unresumable_call(
    hooks: UpstreamHooks | None, provider: str, model: str, payload: Mapping[str, Any]
) -> AsyncIterator[None]:
    """Guard an upstream call that gives no handle to resume (one synchronous request: the
    OpenAI-compatible upstream, fal's sync run). For an async job, the call is recorded on the job
    *before* it is sent; a worker that finds that record (its predecessor stopped during the call)
    fails the job instead of sending the call again, since the upstream may have run and billed it.
    Outside an async job this does nothing."""
    if hooks is None:
        yield
        return
    async with hooks.call(provider, model, payload) as call:
        if call.handle is not None:
            raise UpstreamError(
                f"The worker running this job stopped during its call to {provider}, which cannot be resumed; "
                "the call is not sent again because the upstream may already have run (and billed) it.",
                code="upstream_state_unknown",
                accepted=True,
                fallback=False,
            )
        await call.accepted({"request_id": None, "unresumable": True})
        yield
