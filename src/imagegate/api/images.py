"""`POST /v1/images/edits` and `POST /v1/images/generations`.

Both parse the request (`api.parsing`; a bad request is a 4xx before anything else happens) and
call `app.state.service.run(...)`.

- Non-streaming: the service runs as a task while `receive()` is watched; if the client disconnects
  the task is cancelled (providers cancel their upstream jobs) and nothing is sent. The response is
  `result.body()` as JSON with `result.headers` (e.g. `x-imagegate-params`) added.
- `stream=true`: a `text/event-stream` response (see `ImageEventStream`): `: keepalive` comments
  every `routing.keepalive_seconds` while the service works, then one `image_edit.completed` /
  `image_generation.completed` event per output image. Stream results are always base64 (the
  service runs with `response_format="b64_json"`). A failure within the first keepalive interval,
  before any byte was sent, is a normal JSON error response (so the SDK raises e.g. NotFoundError
  for an unknown model); a later one is `event: error` with the usual envelope as its data.
- Dry run: the header `x-imagegate-dry-run: 1` or the query flag `?dry_run=1` (also `true`/`yes`)
  asks the service what it *would* send upstream; the answer is the 200 JSON
  `DryRunResult.body()`, never a stream, with the result headers.
- Route pin: the header `x-imagegate-route` (or `?route=`) serves the request on one route of the
  model only (an index, a provider, or `provider:upstream-model`; see `CatalogEntry.pinned`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from imagegate.access import service_for
from imagegate.api import jobs as jobs_api
from imagegate.api.admission import charge_inputs
from imagegate.api.errors import GENERIC_SERVER_ERROR, error_response, request_id_of
from imagegate.api.parsing import parse_edit_request, parse_generation_request
from imagegate.api.render import json_response
from imagegate.api.wire import base_url as base_url_of
from imagegate.api.wire import header, query_param
from imagegate.core.errors import GatewayError, InternalError
from imagegate.core.request import ImageRequest
from imagegate.core.results import DryRunResult, ImageResult

__all__ = [
    "DRY_RUN_HEADER",
    "ROUTE_HEADER",
    "ClientDisconnected",
    "ImageEventStream",
    "is_dry_run",
    "router",
    "run_until_disconnect",
    "sse_frame",
    "wait_for_disconnect",
]

logger = logging.getLogger(__name__)
router = APIRouter()

DRY_RUN_HEADER = "x-imagegate-dry-run"
ROUTE_HEADER = "x-imagegate-route"
_DRY_RUN_KEY = DRY_RUN_HEADER.encode("latin-1")
_ROUTE_KEY = ROUTE_HEADER.encode("latin-1")
_TRUE = frozenset({"1", "true", "yes", "on"})
_KEEPALIVE = b": keepalive\n\n"
T = TypeVar("T")
RunResult = ImageResult | DryRunResult
PlanCallback = Callable[[Mapping[str, str]], None]


class ClientDisconnected(Exception):
    """The client went away before the result was ready; the work was cancelled."""


@router.post("/v1/images/edits")
async def create_image_edit(request: Request) -> Response:
    state = request.app.state
    image_request = await parse_edit_request(request, limits=state.settings.limits, pool=state.pool)
    return await _respond(request, image_request, event_prefix="image_edit")


@router.post("/v1/images/generations")
async def create_image(request: Request) -> Response:
    state = request.app.state
    image_request = await parse_generation_request(request, limits=state.settings.limits, pool=state.pool)
    return await _respond(request, image_request, event_prefix="image_generation")


def is_dry_run(request: Request) -> bool:
    """`x-imagegate-dry-run: 1` or `?dry_run=1` (also true/yes/on)."""
    value = header(request, _DRY_RUN_KEY) or query_param(request, "dry_run")
    return value is not None and value.strip().lower() in _TRUE


async def _respond(request: Request, image_request: ImageRequest, *, event_prefix: str) -> Response:
    await charge_inputs(request.scope, image_request)  # the decoded inputs join the in-flight budget
    service = service_for(request)  # the client key's view: allow-list, idempotency, limits, usage
    request_id = request_id_of(request)
    base_url = base_url_of(request)
    dry_run = is_dry_run(request)
    image_request.route = header(request, _ROUTE_KEY) or query_param(request, "route") or None
    if not dry_run and jobs_api.wants_async(request):  # `Prefer: respond-async`: a job (api/jobs.py)
        return await jobs_api.submit_job(request, image_request)
    if image_request.stream and not dry_run:
        streamed = dataclasses.replace(image_request, response_format="b64_json")

        def run(on_plan: PlanCallback) -> Awaitable[RunResult]:
            result: Awaitable[RunResult] = service.run(
                streamed, request_id=request_id, base_url=base_url, on_plan=on_plan
            )
            return result

        return ImageEventStream(
            run,
            event_type=f"{event_prefix}.completed",
            keepalive_seconds=request.app.state.settings.routing.keepalive_seconds,
            request_id=request_id,
        )
    try:
        result = await run_until_disconnect(
            request.receive,
            service.run(image_request, request_id=request_id, base_url=base_url, dry_run=dry_run),
        )
    except ClientDisconnected:
        logger.info("request %s: client disconnected; the work was cancelled", request_id)
        return Response(status_code=499)
    return await json_response(result.body(), headers=result.headers)


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once `receive()` reports `http.disconnect` (call it only after the body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work` in this task while one watcher task reads `receive()`; if the client disconnects
    first, the work is cancelled and ClientDisconnected raised. If this coroutine is itself
    cancelled, the work (running in this task) is cancelled with it. A `receive()` that breaks only
    stops the watching.

    One task per request, not two: the work is not wrapped in a task of its own (hot path)."""
    current = asyncio.current_task()
    assert current is not None
    state = {"disconnected": False, "finished": False}

    def on_watcher_done(watcher: asyncio.Future[None]) -> None:
        if watcher.cancelled() or watcher.exception() is not None or state["finished"]:
            return  # stopped by us, or receive() broke: keep working
        state["disconnected"] = True
        current.cancel()

    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    watcher.add_done_callback(on_watcher_done)
    try:
        result = await work
    except asyncio.CancelledError:
        if state["disconnected"] and current.uncancel() == 0:  # our cancel alone, not the server's
            raise ClientDisconnected from None
        raise
    finally:
        state["finished"] = True
        watcher.cancel()
    if state["disconnected"]:  # the work swallowed our cancel and finished anyway
        current.uncancel()
    return result


class ImageEventStream(Response):
    """The SSE response of a streaming request (OpenAI reference §4).

    The response headers carry the route's `x-imagegate-*` headers: the final ones when the service
    finishes before the first keepalive, else those of the plan in use when the stream starts.
    Nothing is sent until the service finishes or the first keepalive is due (`keepalive_seconds`):
    a failure before that is an ordinary JSON error response with its real status, so the SDK
    raises the matching exception class before iterating (OpenAI: "errors before the first byte").
    Otherwise the 200 `text/event-stream` starts with a `: keepalive` comment, one more every
    `keepalive_seconds`, then one `event: <event_type>` frame per output image, or a single
    `event: error` frame whose data is the usual envelope. Every `event:` line has a one-line JSON
    `data:` line. A client disconnect cancels the service task.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        run: Callable[[PlanCallback], Awaitable[RunResult]],
        *,
        event_type: str,
        keepalive_seconds: float,
        request_id: str | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self._run = run
        self._event_type = event_type
        self._keepalive = max(0.001, keepalive_seconds)
        self._request_id = request_id
        self._plan_headers: dict[str, str] = {}
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    def _start(self, extra: Mapping[str, str]) -> dict[str, Any]:
        headers = [*self.raw_headers, *((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items())]
        return {"type": "http.response.start", "status": 200, "headers": headers}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task: asyncio.Future[RunResult] = asyncio.ensure_future(self._run(self._plan_headers.update))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        started = False
        try:
            waiting: set[asyncio.Future[Any]] = {task, watcher}
            while not task.done():
                done, _ = await asyncio.wait(waiting, timeout=self._keepalive, return_when=asyncio.FIRST_COMPLETED)
                if watcher in done:
                    if watcher.exception() is None:
                        logger.info("request %s: client disconnected from the stream", self._request_id)
                        return
                    waiting.discard(watcher)  # receive() broke: stop watching, keep streaming
                if not task.done():
                    if not started:
                        await send(self._start(self._plan_headers))
                        started = True
                    await self._body(send, _KEEPALIVE)
            result, error = self._outcome(task)
            if error is not None and not started:
                await error_response(error, self._request_id)(scope, receive, send)
                return
            if not started:
                await send(self._start(result.headers if result is not None else self._plan_headers))
            if error is not None:
                await self._body(send, self._error_frame(error))
            else:
                assert result is not None
                for frame in self._event_frames(result):
                    await self._body(send, frame)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were sending
            logger.info("request %s: client disconnected from the stream", self._request_id)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, watcher, return_exceptions=True)

    @staticmethod
    async def _body(send: Send, chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    @staticmethod
    def _outcome(task: asyncio.Future[RunResult]) -> tuple[ImageResult | None, BaseException | None]:
        error = task.exception()
        if error is not None:
            return None, error
        result = task.result()
        if not isinstance(result, ImageResult) or any(image.b64_json is None for image in result.data):
            return None, InternalError("The service returned no base64 image for a stream.")
        return result, None

    def _event_frames(self, result: ImageResult) -> list[bytes]:
        return [
            sse_frame(
                self._event_type,
                {
                    "type": self._event_type,
                    "b64_json": image.b64_json,
                    "created_at": result.created,
                    "size": result.size or "auto",
                    "quality": result.quality,
                    "background": result.background,
                    "output_format": result.output_format,
                    "usage": result.usage,
                },
            )
            for image in result.data
        ]

    def _error_frame(self, exc: BaseException) -> bytes:
        if isinstance(exc, GatewayError):
            if exc.status >= 500:
                logger.warning("request %s failed mid-stream: %r", self._request_id, exc)
            return sse_frame("error", exc.envelope())
        logger.error("request %s: error while streaming", self._request_id, exc_info=exc)
        return sse_frame("error", InternalError(GENERIC_SERVER_ERROR).envelope())


def sse_frame(event: str, data: Any) -> bytes:
    """`event: <event>\\ndata: <one-line JSON>\\n\\n`."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()
