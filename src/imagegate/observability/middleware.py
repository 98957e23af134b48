"""The one observability seam: a pure ASGI middleware, outermost, around every HTTP request.

Per request it opens a `core.telemetry.RequestTelemetry` (what the service reports: model,
upstream calls and their outcomes, retries, fallbacks, post-processing steps, images), watches the
response start (status and the `x-imagegate-*` headers the service and the access layer set), and
when the request is over updates the Prometheus metrics and writes one request log line.

What it reads, and from where:
    key name            `request.state.key_name` (set by the auth layer; absent -> `anonymous`)
    request id          `request.state.request_id` (RequestContextMiddleware)
    model               the catalog model the service served (`-` if the request never got there)
    provider, upstream  `x-imagegate-provider`, `x-imagegate-upstream-model`, `x-imagegate-upstream-request-id`
    parameter report    `x-imagegate-params` (`size=converted; n=emulated`)
    cost                `x-imagegate-cost-usd` (a decimal string)

It also tracks the request tasks in flight (`InFlight`), so the app's shutdown can wait for them
(and for the upstream cancellations they run when cancelled) before closing the HTTP client.
Nothing here reads a request or response body: no image bytes, no key, no token reach the log.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegate.core import telemetry
from imagegate.core.params import GATEWAY_PARAMS, KNOWN_PARAMS, SIZE_PARAMS
from imagegate.core.telemetry import RequestTelemetry
from imagegate.observability.logs import FIELDS_ATTR
from imagegate.observability.metrics import Metrics
from imagegate.observability.shutdown import InFlight, ShutdownAnswer

__all__ = ["ANONYMOUS", "InFlight", "ObservabilityMiddleware", "parse_params"]

access_log = logging.getLogger("imagegate.requests")
log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
_QUIET = frozenset({"/metrics", "/healthz", "/readyz"})  # probes and scrapes log at debug
_MODES = frozenset({"passthrough", "renamed", "converted", "emulated", "rejected", "ignored"})
_PARAM = re.compile(r"\A[a-z][a-z0-9_]{0,39}\Z")
_KEY_NAME = re.compile(r"\A[\x21-\x7e]{1,64}\Z")
# The `param` label: a parameter the tables know; fields a client made up count as `other`.
_PARAM_LABELS = frozenset({*KNOWN_PARAMS, *GATEWAY_PARAMS, *SIZE_PARAMS})
OTHER_PARAM = "other"
_WATCHED = {  # the response headers read, by their lower-cased raw name
    name.encode("latin-1"): name
    for name in (
        "x-imagegate-provider",
        "x-imagegate-upstream-model",
        "x-imagegate-upstream-request-id",
        "x-imagegate-params",
        "x-imagegate-cost-usd",
        "content-type",
    )
}
_MAX_PROMPT_CHARS = 2000
_CAPABILITY_PATHS = ("/v1/files/",)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_params(header: str) -> dict[str, str]:
    """`size=converted; n=emulated` -> {"size": "converted", "n": "emulated"} (well-formed pairs only)."""
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, _, mode = part.strip().partition("=")
        if _PARAM.match(name) and mode in _MODES:
            out[name] = mode
    return out


def _endpoint(scope: Scope) -> str:
    """The route template that served the request; for one answered before routing (a 401 from the
    auth layer, a 413), the template its path matches; `other` for unknown paths."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    for route in _leaf_routes(getattr(scope.get("app"), "routes", ())):
        try:
            match, _ = route.matches(scope)
        except Exception:  # a route that cannot judge this scope
            continue
        if match is Match.FULL:
            return str(route.path)
    return "other"


def _leaf_routes(routes: Any, depth: int = 0) -> Iterator[Any]:
    """Every route with a path template, inside included routers too (however the framework wraps them)."""
    for route in routes:
        inner = getattr(route, "routes", None) or getattr(getattr(route, "original_router", None), "routes", None)
        if inner and depth < 4:
            yield from _leaf_routes(inner, depth + 1)
        elif isinstance(getattr(route, "path", None), str) and hasattr(route, "matches"):
            yield route


def _cost(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        cost = float(Decimal(value.strip()))
    except (InvalidOperation, ValueError):
        return None
    return cost if math.isfinite(cost) and cost >= 0 else None


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, inflight: InFlight, log_prompts: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.inflight = inflight
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record, token = telemetry.begin(scope.setdefault("state", {}))
        task = asyncio.current_task()
        if task is not None:
            self.inflight.tasks.add(task)
        self.metrics.in_flight.inc()
        response: dict[str, Any] = {"status": None, "headers": {}, "finished": False}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                headers = response["headers"]
                for raw_name, raw_value in message.get("headers", ()):
                    name = _WATCHED.get(bytes(raw_name).lower())
                    if name is not None:
                        headers[name] = bytes(raw_value).decode("latin-1")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                response["finished"] = True
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError as exc:
            # Only the server cancels a request task: at shutdown, after `shutdown_grace_seconds`.
            # The upstream jobs have been cancelled on the way out; end the response cleanly if we can.
            error = exc
            answer = ShutdownAnswer(
                started=response["status"] is not None,
                finished=response["finished"],
                event_stream=response["headers"].get("content-type", "").startswith("text/event-stream"),
                costly=bool(record.upstream),
                request_id=record.state.get("request_id"),
            )
            if not await answer.send(send):
                raise
            response["status"] = response["status"] or 503
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.metrics.in_flight.dec()
            if task is not None:
                self.inflight.tasks.discard(task)
            # No response: cancelled, or the app returned without answering (its client went away) -> 499.
            unanswered = error is None or isinstance(error, asyncio.CancelledError)
            status = response["status"] or (499 if unanswered else 500)
            try:
                self._finish(scope, record, status, response["headers"])
            except Exception:  # observability must never break a response
                log.exception("could not record the request's metrics")
            finally:
                telemetry.end(token)

    def _finish(self, scope: Scope, record: RequestTelemetry, status: int, headers: dict[str, str]) -> None:
        total = time.monotonic() - record.started
        endpoint = _endpoint(scope)
        model = record.model or "-"
        key_name = record.state.get("key_name")
        key = key_name if isinstance(key_name, str) and _KEY_NAME.match(key_name) else ANONYMOUS
        m = self.metrics
        child = m.child
        child(m.requests, endpoint, model, str(status), key).inc()
        child(m.request_duration, endpoint, model).observe(total)
        for call in record.upstream:
            child(m.upstream_requests, call.provider, call.outcome).inc()
            child(m.upstream_duration, call.provider).observe(call.seconds)
        for provider in record.retries:
            child(m.retries, provider).inc()
        for fallback_model in record.fallbacks:
            child(m.fallbacks, fallback_model).inc()
        for step in record.steps:
            child(m.postprocess, step.op).observe(step.seconds)
        params = parse_params(headers.get("x-imagegate-params", ""))
        cost = _cost(headers.get("x-imagegate-cost-usd"))
        if record.images and record.provider:
            child(m.images, model, record.provider).inc(record.images)
            for param, mode in params.items():
                if mode != "passthrough":
                    child(m.emulations, param if param in _PARAM_LABELS else OTHER_PARAM, mode).inc()
        if cost is not None and 200 <= status < 300:
            child(m.cost, key, model).inc(cost)
        self._log(scope, record, status, headers, params, cost, endpoint, key, total)

    def _log(
        self,
        scope: Scope,
        record: RequestTelemetry,
        status: int,
        headers: dict[str, str],
        params: dict[str, str],
        cost: float | None,
        endpoint: str,
        key: str,
        total: float,
    ) -> None:
        path = str(scope.get("path", ""))[:200]
        if path.startswith(_CAPABILITY_PATHS):
            path = endpoint  # an image id is what grants access to the image: it stays out of the log
        # The server decodes `%0a` and friends: written raw, they would start a forged log line.
        path = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", path)
        level = logging.DEBUG if path in _QUIET and status < 400 else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        upstream_ms = round(record.upstream_seconds() * 1000, 3)
        post_ms = round(record.postprocess_seconds() * 1000, 3)
        total_ms = round(total * 1000, 3)
        provider = headers.get("x-imagegate-provider") or record.provider
        fields: dict[str, Any] = {
            "method": scope.get("method"),
            "path": path,
            "endpoint": endpoint,
            "status": status,
            "key": key,
            "model": record.model,
            "operation": record.operation,
            "provider": provider,
            "upstream_model": headers.get("x-imagegate-upstream-model"),
            "upstream_request_id": headers.get("x-imagegate-upstream-request-id"),
            "images": record.images,
            "duration_ms": {"total": total_ms, "upstream": upstream_ms, "postprocess": post_ms},
            "upstream_calls": len(record.upstream),
            "retries": len(record.retries),
            "fallbacks": len(record.fallbacks),
            "params": params,
            "cost_usd": cost,
        }
        if self.log_prompts and record.prompt is not None:
            fields["prompt"] = record.prompt[:_MAX_PROMPT_CHARS]
        summary = f"key={key} model={record.model or '-'} provider={provider or '-'}"
        if record.upstream or record.steps:
            summary += f" upstream={upstream_ms}ms post={post_ms}ms"
        access_log.log(
            level,
            "%s %s %s in %sms (%s)",
            scope.get("method"),
            path,
            status,
            total_ms,
            summary,
            extra={FIELDS_ATTR: fields},
        )
