"""A protocol-faithful fake of fal's queue API, sync run, storage upload and CDN (see fal-protocol.md).

One Starlette app plays every fal host. Tests configure the adapter with::

    queue_url = srv.url            # https://queue.fal.run  -> POST /{owner}/{app}[/{path}], .../requests/{id}...
    run_url   = srv.url + "/sync"  # https://fal.run        -> POST /sync/{owner}/{app}[/{path}]
    rest_url  = srv.url            # https://rest.fal.ai    -> POST /storage/upload/initiate
    # CDN files (generated outputs and uploads) are served at  GET /files/{name}

Time is measured in *status polls*: every ``GET .../status`` (and every tick of the SSE stream) moves
a request one step through ``queue_polls`` x IN_QUEUE, then ``progress_polls`` x IN_PROGRESS, then
COMPLETED (or, with ``model_seconds``, IN_PROGRESS until that much wall time after the submit: a
model's real run time, for load). The result endpoint does not advance a request. Everything a test can vary lives in
``FalScenario``; pick one per request with ``fake.scenario`` (default), ``fake.model_scenarios[endpoint_id]``
or ``fake.script`` (a queue consumed one per accepted submit/run).

Hostile modes: ``fake.echo_auth = True`` makes every error answer (bodies, HTML pages, ``error`` in status
payloads) quote the request's ``Authorization`` header, as a misconfigured proxy would; ``fake.foreign_base``
makes submit responses name another host in ``status_url``/``response_url``/``cancel_url``.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .images import color_for, data_uri, ext_for, image_bytes, image_size, load_image_bytes, mime_for
from .server import RecordedRequest, record_request

# fal toolkit IMAGE_SIZE_PRESETS (fal-protocol.md §7).
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
DEFAULT_SIZE = (1024, 768)  # no image_size and no decodable input image (= qwen-image's landscape_4_3 default)
OUTPUT_FORMATS = ("png", "jpeg", "webp")
CONTENT_POLICY_MSG = "The content could not be processed because it contained material flagged by a content checker."
NAMESPACES = ("workflows", "comfy")

Status = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]


# --------------------------------------------------------------------------------------------------
# Errors (data) and scenarios


@dataclass(frozen=True)
class FalError:
    """An HTTP error fal answers with. ``body`` dict/list -> JSON; str -> text/html (ingress page).

    ``input_mode`` fills ``detail[i].input`` from the submitted input: "whole" (the whole input object,
    as observed for content-policy rejections) or "field" (the value at ``loc[1:]``, Pydantic style).
    ``with_request_id`` adds ``x-fal-request-id`` (fal's own servers do; nginx ingress errors don't).
    """

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    with_request_id: bool = True
    input_mode: Literal["whole", "field"] | None = None

    def response(self, request_id: str | None, payload: Any = None, echo: str | None = None) -> Response:
        """``echo``: a request header value to quote in the body (hostile upstream mode)."""
        headers = dict(self.headers)
        if self.with_request_id and request_id:
            headers["x-fal-request-id"] = request_id
        if isinstance(self.body, str):
            page = self.body
            if echo is not None:  # in the title (what a gateway would quote) and in the body
                page = page.replace("</title>", f" ({echo})</title>").replace("</body>", f"<pre>{echo}</pre></body>")
                page += f"<p>request headers: authorization={echo}</p>"
            return Response(page, self.status, headers=headers, media_type="text/html")
        body = json.loads(json.dumps(self.body))
        if self.input_mode and isinstance(body, dict) and isinstance(body.get("detail"), list):
            for item in body["detail"]:
                item["input"] = payload if self.input_mode == "whole" else _at(payload, item.get("loc", [])[1:])
        if echo is not None and isinstance(body, dict):
            if isinstance(body.get("detail"), list):
                for item in body["detail"]:
                    item["msg"] = f"{item.get('msg', '')} (sent with Authorization: {echo})"
                    item.setdefault("loc", ["body", "prompt"])
            else:
                body["detail"] = f"{body.get('detail', '')} [Authorization: {echo}]"
            body["request_headers"] = {"authorization": echo}
        return JSONResponse(body, self.status, headers=headers)


def platform_error(
    status: int, error_type: str, detail: str, *, with_request_id: bool = True, **headers: str
) -> FalError:
    """Request/infra error: ``{"detail", "error_type"}`` + ``X-Fal-Error-Type`` (fal-protocol.md §5.1)."""
    hdrs = {"X-Fal-Error-Type": error_type, **{k.replace("_", "-"): v for k, v in headers.items()}}
    return FalError(status, {"detail": detail, "error_type": error_type}, hdrs, with_request_id)


def runner_scheduling_failure(*, with_request_id: bool = True) -> FalError:
    return platform_error(
        503, "runner_scheduling_failure", "Failed to schedule a runner", with_request_id=with_request_id
    )


def runner_disconnected() -> FalError:
    return platform_error(503, "runner_disconnected", "Runner disconnected")


def request_timeout_user() -> FalError:
    """504 for an expired ``X-Fal-Request-Timeout`` deadline; clients must not retry it."""
    return platform_error(504, "request_timeout", "Request timed out", X_Fal_Request_Timeout_Type="user")


def client_cancelled() -> FalError:
    return platform_error(499, "client_cancelled", "Request was cancelled by the client")


def rate_limited(retry_after: int = 1, *, with_request_id: bool = False) -> FalError:
    return FalError(
        429,
        {"detail": "Too many requests, please retry later"},
        {"Retry-After": str(retry_after)},
        with_request_id,
    )


def unauthorized(detail: str = "No user found for Key ID and Secret") -> FalError:
    return FalError(401, {"detail": detail}, with_request_id=False)


def ingress_error(status: int = 502) -> FalError:
    """An nginx error page without ``x-fal-request-id``: safe for a client to retry."""
    text = {502: "Bad Gateway", 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}
    title = f"{status} {text.get(status, 'Error')}"
    page = f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
    return FalError(status, page + "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n", with_request_id=False)


def content_policy_violation(field_name: str = "prompt") -> FalError:
    """The observed 422 for a content-checker rejection (status was COMPLETED without ``error``)."""
    item = {
        "loc": ["body", field_name],
        "msg": CONTENT_POLICY_MSG,
        "type": "content_policy_violation",
        "url": "https://docs.fal.ai/errors#content_policy_violation",
    }
    return FalError(422, {"detail": [item]}, input_mode="whole")


def validation_error(
    field_name: str,
    msg: str = "Input should be a valid value",
    type_: str = "value_error",
    ctx: dict[str, Any] | None = None,
) -> FalError:
    """A Pydantic-style 422 on ``loc: ["body", <field>]`` (``input`` = that field's submitted value)."""
    item: dict[str, Any] = {"loc": ["body", *field_name.split(".")], "msg": msg, "type": type_}
    if ctx is not None:
        item["ctx"] = ctx
    return FalError(422, {"detail": [item]}, input_mode="field")


@dataclass
class FalScenario:
    """What fal does with one request. All fields are optional; the default is a quick success."""

    queue_polls: int = 1  # status polls answered 202 IN_QUEUE (queue_position counts down to 0)
    progress_polls: int | None = 1  # then 202 IN_PROGRESS; None = in progress until cancelled
    model_seconds: float | None = None  # instead of progress_polls: IN_PROGRESS until this much wall time after submit
    submit_errors: list[FalError] = field(default_factory=list)  # answers to the first K submit attempts
    status_errors: list[FalError] = field(default_factory=list)  # answers to the first K status polls (per job)
    always_fail_status: FalError | None = None  # every status poll gets this
    always_fail_submit: FalError | None = None  # every submit/run attempt gets this
    result_error: FalError | None = None  # the result endpoint (and sync run) answers this when done
    completed_error: str | None = None  # COMPLETED status carries ``error`` ...
    completed_error_type: str | None = None  # ... and ``error_type``
    run_delay: float = 0.0  # sync run: seconds before answering (progress_polls=None: until disconnect)
    stream_interval: float = 0.02  # SSE: seconds per status tick
    keepalive_interval: float = 0.1  # SSE: ``: keepalive`` comment cadence while the state is unchanged
    seed: int = 42  # used when the input has no ``seed``
    has_nsfw_concepts: list[bool] | None = None  # default: [False] * num_images
    logs: list[dict[str, Any]] | None = None  # for ``?logs=1``; default: one INFO line
    inference_time: float = 0.1
    output_bytes: bytes | None = None  # serve these bytes (e.g. not an image) as every output file
    submits_seen: int = field(default=0, init=False, repr=False, compare=False)

    @classmethod
    def instant(cls, **kw: Any) -> FalScenario:
        """COMPLETED on the first status poll."""
        return cls(queue_polls=0, progress_polls=0, **kw)

    @classmethod
    def hang(cls, **kw: Any) -> FalScenario:
        """Stays IN_PROGRESS (sync run: never answers) until cancelled / the client disconnects."""
        return cls(progress_polls=None, **kw)

    @classmethod
    def content_policy(cls, field_name: str = "prompt", **kw: Any) -> FalScenario:
        return cls(result_error=content_policy_violation(field_name), **kw)

    @classmethod
    def runner_disconnected(cls, **kw: Any) -> FalScenario:
        return cls(
            completed_error="Runner disconnected",
            completed_error_type="runner_disconnected",
            result_error=runner_disconnected(),
            **kw,
        )


# --------------------------------------------------------------------------------------------------
# Recorded state


@dataclass
class FalJob:
    """One accepted request (queue submit or sync run). ``input`` is the exact JSON body sent."""

    request_id: str
    endpoint_id: str  # full id as submitted, e.g. "fal-ai/qwen-image-edit-2511/lora"
    app_path: str  # what status/result/cancel URLs use, e.g. "fal-ai/qwen-image-edit-2511"
    mode: Literal["queue", "sync"]
    input: Any
    headers: dict[str, str]
    query: dict[str, str]
    scenario: FalScenario
    polls: int = 0  # status ticks consumed (polls + SSE ticks)
    status_errors_sent: int = 0
    cancelled: bool = False
    finished: bool = False  # forced COMPLETED (sync runs)
    disconnected: bool = False  # sync run client went away before the answer
    output: dict[str, Any] | None = None
    submitted_at: float = field(default_factory=time.monotonic)

    def state(self) -> tuple[Status, int | None]:
        sc = self.scenario
        if self.cancelled or self.finished:
            return "COMPLETED", None
        if self.polls < sc.queue_polls:
            return "IN_QUEUE", sc.queue_polls - 1 - self.polls
        if sc.model_seconds is not None:
            return ("COMPLETED" if time.monotonic() >= self.submitted_at + sc.model_seconds else "IN_PROGRESS"), None
        if sc.progress_polls is None or self.polls < sc.queue_polls + sc.progress_polls:
            return "IN_PROGRESS", None
        return "COMPLETED", None


@dataclass
class FalUpload:
    """A storage upload: ``initiate`` fills the first fields, the PUT fills ``data``/``put_content_type``."""

    token: str
    file_name: str
    content_type: str
    storage_type: str | None
    upload_url: str
    file_url: str
    initiate_headers: dict[str, str]
    data: bytes | None = None
    put_content_type: str | None = None


_CTRL = re.compile(r"^(?P<app>.+?)/requests/(?P<id>[^/]+)(?P<suffix>/status/stream|/status|/cancel)?$")


class FakeFal:
    """Fake fal. ``key=None`` disables the ``Authorization: Key <key>`` check."""

    def __init__(self, key: str | None = "test-fal-key", scenario: FalScenario | None = None) -> None:
        self.key = key
        self.scenario = scenario or FalScenario()
        self.model_scenarios: dict[str, FalScenario] = {}  # by full endpoint id, or by "owner/app"
        self.script: deque[FalScenario] = deque()  # consumed one per accepted submit/run, wins over the rest
        self._lock = threading.Lock()
        self.stopping = threading.Event()  # set by LocalServer.stop: deliberately hanging handlers return
        self.reset()
        self.app = Starlette(
            routes=[
                Route("/storage/upload/initiate", self._initiate_upload, methods=["POST"]),
                Route("/uploads/{token}", self._put_upload, methods=["PUT"]),
                Route("/files/{name:path}", self._get_file, methods=["GET", "HEAD"]),
                Route("/sync/{path:path}", self._sync_run, methods=["POST"]),
                Route("/{path:path}", self._submit, methods=["POST"]),
                Route("/{path:path}", self._get, methods=["GET"]),
                Route("/{path:path}", self._put, methods=["PUT"]),
            ]
        )
        self.app.state.on_start = self.stopping.clear
        self.app.state.on_stop = self.stopping.set
        self.echo_auth = False  # quote the request's Authorization header in every error answer
        self.foreign_base: str | None = None  # e.g. "http://127.0.0.1:9/": submit URLs name this host

    def _echo(self, headers: Any) -> str | None:
        return (headers.get("authorization") or "") if self.echo_auth else None

    def reset(self) -> None:
        """Forget every recorded request, job, upload and file (scenarios are kept)."""
        with self._lock:
            self.requests: list[RecordedRequest] = []  # every request, in arrival order
            self.jobs: dict[str, FalJob] = {}
            self.submits: list[FalJob] = []  # accepted queue submits
            self.runs: list[FalJob] = []  # accepted sync runs
            self.rejected_submits: list[RecordedRequest] = []  # submit/run attempts answered with an error
            self.status_polls: list[str] = []  # request id per GET .../status
            self.stream_opens: list[str] = []  # request id per GET .../status/stream
            self.result_fetches: list[str] = []  # request id per GET response_url
            self.cancels: list[str] = []  # request id per PUT cancel_url (whatever the answer)
            self.uploads: list[FalUpload] = []
            self.files: dict[str, tuple[bytes, str]] = {}  # CDN name -> (bytes, content type)

    def peak_in_flight(self) -> int:
        """The most queue jobs in flight at once, in arrival order: from a submit to the first
        fetch of its result (what a client's concurrency limit should bound)."""
        running = peak = 0
        done: set[str] = set()
        with self._lock:
            requests = list(self.requests)
        for rec in requests:
            parts = rec.path.strip("/").split("/")
            if rec.method == "POST" and "requests" not in parts and parts[0] not in ("sync", "storage"):
                running += 1
                peak = max(peak, running)
            elif rec.method == "GET" and len(parts) >= 2 and parts[-2] == "requests" and parts[-1] not in done:
                done.add(parts[-1])
                running -= 1
        return peak

    @property
    def last_submit(self) -> FalJob:
        return (self.submits or self.runs)[-1]

    # ---- helpers -------------------------------------------------------------------------------

    async def _record(self, request: Request) -> RecordedRequest:
        rec = await record_request(request)
        with self._lock:
            self.requests.append(rec)
        return rec

    def _auth_error(self, request: Request) -> Response | None:
        if self.key is None:
            return None
        header = request.headers.get("authorization")
        if header is None:
            return unauthorized("Authentication is required to perform this action").response(None)
        if header != f"Key {self.key}":
            return unauthorized().response(None)
        return None

    def _pick_scenario(self, endpoint_id: str, app_path: str) -> FalScenario:
        if self.script:
            return self.script[0]
        return self.model_scenarios.get(endpoint_id) or self.model_scenarios.get(app_path) or self.scenario

    def _admit(self, rec: RecordedRequest, endpoint_id: str, mode: Literal["queue", "sync"]) -> FalJob | Response:
        """Auth/scenario/submit-error checks shared by queue submit and sync run."""
        app_path = _app_path(endpoint_id)
        if app_path is None:
            return JSONResponse({"detail": "Application not found"}, 404)
        with self._lock:
            scenario = self._pick_scenario(endpoint_id, app_path)
            attempt = scenario.submits_seen
            scenario.submits_seen += 1
            error = scenario.always_fail_submit or (
                scenario.submit_errors[attempt] if attempt < len(scenario.submit_errors) else None
            )
            if error is not None:
                self.rejected_submits.append(rec)
                return error.response(_new_id(), rec.json, self._echo(rec.headers))
            if rec.json is None and rec.body.strip() not in (b"", b"null"):
                self.rejected_submits.append(rec)
                return JSONResponse({"detail": "Invalid JSON body"}, 400)
            if self.script and self.script[0] is scenario:
                self.script.popleft()
            job = FalJob(_new_id(), endpoint_id, app_path, mode, rec.json, rec.headers, rec.query, scenario)
            self.jobs[job.request_id] = job
            (self.submits if mode == "queue" else self.runs).append(job)
        return job

    def _status_body(self, job: FalJob, base: str, status: Status, position: int | None, logs: bool) -> dict[str, Any]:
        sc = job.scenario
        body: dict[str, Any] = {"status": status, "request_id": job.request_id, **_urls(base, job)}
        if status == "IN_QUEUE":
            body["queue_position"] = position
        body["logs"] = (sc.logs if sc.logs is not None else _default_logs()) if logs else None
        if status == "COMPLETED":
            body["metrics"] = {"inference_time": sc.inference_time} if not job.cancelled else {}
            if sc.completed_error is not None or sc.completed_error_type is not None:
                echo = self._echo(job.headers)
                body["error"] = sc.completed_error if echo is None else f"{sc.completed_error} (Authorization: {echo})"
                body["error_type"] = sc.completed_error_type
        return body

    def _lookup_file(self, url: str) -> bytes | None:
        path = urlsplit(url).path
        if path.startswith("/files/"):
            found = self.files.get(path[len("/files/") :])
            return found[0] if found else None
        return None

    async def _final_response(self, job: FalJob, base: str) -> Response:
        """What a finished job answers on its response_url (and what a sync run returns)."""
        if job.cancelled:
            return client_cancelled().response(job.request_id, echo=self._echo(job.headers))
        if job.scenario.result_error is not None:
            return job.scenario.result_error.response(job.request_id, job.input, self._echo(job.headers))
        if job.output is None:
            job.output = await self._make_output(job, base)
        return JSONResponse(job.output, headers={"x-fal-request-id": job.request_id})

    async def _make_output(self, job: FalJob, base: str) -> dict[str, Any]:
        inp: dict[str, Any] = job.input if isinstance(job.input, dict) else {}
        fmt = inp.get("output_format", "png")
        fmt = fmt if fmt in OUTPUT_FORMATS else "png"
        n = inp.get("num_images", 1)
        n = n if isinstance(n, int) and n > 0 else 1
        raw_seed = inp.get("seed")
        seed: int = raw_seed if isinstance(raw_seed, int) else job.scenario.seed
        w, h = await self._output_size(inp)
        images = []
        for i in range(n):
            data = job.scenario.output_bytes or image_bytes(fmt, w, h, color_for(seed + i))
            name = f"{uuid.uuid4().hex[:8]}/{uuid.uuid4().hex[:20]}.{ext_for(fmt)}"
            if inp.get("sync_mode") is True:
                url = data_uri(data, mime_for(fmt))
            else:
                with self._lock:
                    self.files[name] = (data, mime_for(fmt))
                url = f"{base}files/{name}"
            images.append(
                {
                    "url": url,
                    "width": w,
                    "height": h,
                    "content_type": mime_for(fmt),
                    "file_name": name.rsplit("/", 1)[-1],
                    "file_size": len(data),
                }
            )
        nsfw = job.scenario.has_nsfw_concepts
        return {
            "images": images,
            "seed": seed,
            "has_nsfw_concepts": list(nsfw) if nsfw is not None else [False] * n,
            "prompt": inp.get("prompt", ""),
            "timings": {"inference": job.scenario.inference_time},
        }

    async def _output_size(self, inp: dict[str, Any]) -> tuple[int, int]:
        size = inp.get("image_size")
        if isinstance(size, str) and size in IMAGE_SIZE_PRESETS:
            return IMAGE_SIZE_PRESETS[size]
        if isinstance(size, dict) and isinstance(size.get("width"), int) and isinstance(size.get("height"), int):
            return size["width"], size["height"]
        urls = inp.get("image_urls")
        first = urls[0] if isinstance(urls, list) and urls else inp.get("image_url")
        if size is None and isinstance(first, str):
            data = await load_image_bytes(first, self._lookup_file)
            dims = image_size(data) if data else None
            if dims:
                return dims
        return DEFAULT_SIZE

    def _job_for(self, app: str, request_id: str) -> FalJob | None:
        job = self.jobs.get(request_id)
        return job if job is not None and job.app_path == app else None

    # ---- queue -----------------------------------------------------------------------------------

    async def _submit(self, request: Request) -> Response:
        rec = await self._record(request)
        if (denied := self._auth_error(request)) is not None:
            return denied
        endpoint_id = request.path_params["path"].strip("/")
        if _CTRL.match(endpoint_id):
            return JSONResponse({"detail": "Method Not Allowed"}, 405)
        job = self._admit(rec, endpoint_id, "queue")
        if isinstance(job, Response):
            return job
        body = {
            "status": "IN_QUEUE",
            "request_id": job.request_id,
            **_urls(self.foreign_base or str(request.base_url), job),
            "queue_position": max(job.scenario.queue_polls - 1, 0),
        }
        return JSONResponse(body, headers={"x-fal-request-id": job.request_id})

    async def _get(self, request: Request) -> Response:
        await self._record(request)
        m = _CTRL.match(request.path_params["path"].strip("/"))
        if m is None or m["suffix"] == "/cancel":
            return JSONResponse({"detail": "Not Found"}, 404)
        if (denied := self._auth_error(request)) is not None:
            return denied
        job = self._job_for(m["app"], m["id"])
        if job is None:
            return JSONResponse({"detail": "Request not found"}, 404)
        base = str(request.base_url)
        logs = request.query_params.get("logs", "0").lower() in ("1", "true")
        if m["suffix"] == "/status":
            with self._lock:
                self.status_polls.append(job.request_id)
                sc = job.scenario
                error = sc.always_fail_status or (
                    sc.status_errors[job.status_errors_sent] if job.status_errors_sent < len(sc.status_errors) else None
                )
                if error is not None:
                    job.status_errors_sent += 1
                    return error.response(job.request_id, job.input, self._echo(request.headers))
                status, position = job.state()
                job.polls += 1
            code = 200 if status == "COMPLETED" else 202
            return JSONResponse(self._status_body(job, base, status, position, logs), code)
        if m["suffix"] == "/status/stream":
            with self._lock:
                self.stream_opens.append(job.request_id)
            return StreamingResponse(
                self._stream(job, base, logs),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "x-fal-request-id": job.request_id},
            )
        with self._lock:
            self.result_fetches.append(job.request_id)
            status, position = job.state()
        if status != "COMPLETED":
            body = self._status_body(job, base, status, position, False)
            return JSONResponse(body, 202, headers={"x-fal-request-id": job.request_id})
        return await self._final_response(job, base)

    async def _stream(self, job: FalJob, base: str, logs: bool) -> AsyncIterator[str]:
        yield ": keepalive\n\n"
        last: tuple[Status, int | None] | None = None
        last_sent = time.monotonic()
        while True:
            with self._lock:
                state = job.state()
                job.polls += 1
            if state != last:
                yield f"data: {json.dumps(self._status_body(job, base, *state, logs))}\n\n"
                last, last_sent = state, time.monotonic()
            elif time.monotonic() - last_sent >= job.scenario.keepalive_interval:
                yield ": keepalive\n\n"
                last_sent = time.monotonic()
            if state[0] == "COMPLETED" or self.stopping.is_set():
                return
            await asyncio.sleep(job.scenario.stream_interval)

    async def _put(self, request: Request) -> Response:
        await self._record(request)
        m = _CTRL.match(request.path_params["path"].strip("/"))
        if m is None or m["suffix"] != "/cancel":
            return JSONResponse({"detail": "Method Not Allowed"}, 405)
        if (denied := self._auth_error(request)) is not None:
            return denied
        with self._lock:
            job = self._job_for(m["app"], m["id"])
            if job is None:
                return JSONResponse({"status": "NOT_FOUND"}, 404)
            self.cancels.append(job.request_id)
            if job.state()[0] == "COMPLETED":
                return JSONResponse({"status": "ALREADY_COMPLETED"}, 400)
            job.cancelled = True
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202)

    # ---- sync run (fal.run) ----------------------------------------------------------------------

    async def _sync_run(self, request: Request) -> Response:
        rec = await self._record(request)
        if (denied := self._auth_error(request)) is not None:
            return denied
        job = self._admit(rec, request.path_params["path"].strip("/"), "sync")
        if isinstance(job, Response):
            return job
        sc = job.scenario
        deadline = None if sc.progress_polls is None else time.monotonic() + sc.run_delay
        while deadline is None or time.monotonic() < deadline:
            if await request.is_disconnected():
                job.disconnected = True
                return Response(status_code=499)
            if self.stopping.is_set():
                return ingress_error(503).response(None)
            await asyncio.sleep(0.01 if deadline is None else min(0.01, max(deadline - time.monotonic(), 0)))
        job.finished = True
        return await self._final_response(job, str(request.base_url))

    # ---- storage + CDN ---------------------------------------------------------------------------

    async def _initiate_upload(self, request: Request) -> Response:
        rec = await self._record(request)
        if (denied := self._auth_error(request)) is not None:
            return denied
        body = rec.json if isinstance(rec.json, dict) else {}
        file_name = str(body.get("file_name") or "upload.bin")
        token = uuid.uuid4().hex
        base = str(request.base_url)
        upload = FalUpload(
            token=token,
            file_name=file_name,
            content_type=str(body.get("content_type") or "application/octet-stream"),
            storage_type=request.query_params.get("storage_type"),
            upload_url=f"{base}uploads/{token}",
            file_url=f"{base}files/{token[:8]}/{token[8:]}_{file_name}",
            initiate_headers=rec.headers,
        )
        with self._lock:
            self.uploads.append(upload)
        return JSONResponse({"upload_url": upload.upload_url, "file_url": upload.file_url})

    async def _put_upload(self, request: Request) -> Response:
        rec = await self._record(request)
        with self._lock:
            upload = next((u for u in self.uploads if u.token == request.path_params["token"]), None)
            if upload is None:
                return Response("NoSuchUpload", 404)
            upload.data = rec.body
            upload.put_content_type = rec.headers.get("content-type")
            name = upload.file_url.split("/files/", 1)[1]
            self.files[name] = (rec.body, upload.put_content_type or upload.content_type)
        return Response(status_code=200)

    async def _get_file(self, request: Request) -> Response:
        await self._record(request)
        found = self.files.get(request.path_params["name"])
        if found is None:
            return Response("Not Found", 404, media_type="text/plain")
        return Response(found[0], media_type=found[1])


def _new_id() -> str:
    return str(uuid.uuid4())


def _app_path(endpoint_id: str) -> str | None:
    """``owner/app[/path]`` -> ``owner/app`` (namespaces ``workflows/``/``comfy/`` kept)."""
    parts = [p for p in endpoint_id.split("/") if p]
    if parts and parts[0] in NAMESPACES:
        return "/".join(parts[:3]) if len(parts) >= 3 else None
    return "/".join(parts[:2]) if len(parts) >= 2 else None


def _urls(base: str, job: FalJob) -> dict[str, str]:
    root = f"{base}{job.app_path}/requests/{job.request_id}"
    return {"response_url": root, "status_url": f"{root}/status", "cancel_url": f"{root}/cancel"}


def _default_logs() -> list[dict[str, Any]]:
    ts = datetime.now(UTC).isoformat()
    return [{"message": "Generating image", "level": "INFO", "source": "USER", "timestamp": ts}]


def _at(payload: Any, path: list[Any]) -> Any:
    for key in path:
        found = (isinstance(payload, dict) and key in payload) or (
            isinstance(payload, list) and isinstance(key, int) and 0 <= key < len(payload)
        )
        if not found:
            return None
        payload = payload[key]
    return payload


def fal_provider_settings(url: str, **overrides: Any) -> dict[str, Any]:
    """`providers.fal` of a gateway pointed at a FakeFal served at `url` (fast polling)."""
    return {
        "key": "test-fal-key",
        "queue_url": url,
        "run_url": url + "/sync",
        "rest_url": url,
        "poll_interval": 0.01,
        "poll_max_interval": 0.02,
        **overrides,
    }
