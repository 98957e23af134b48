"""A protocol-faithful fake of Replicate's HTTP API (predictions + Files API; see replicate-protocol.md).

Tests configure the adapter with ``base_url = srv.url + "/v1"`` (plays ``https://api.replicate.com/v1``).
Generated outputs are served without auth at ``GET /files/{prediction_id}/out-{i}.{ext}`` (plays
``replicate.delivery``).

Time is measured in *ticks*. A prediction is created at tick 0; every ``GET /v1/predictions/{id}``
advances it one tick, and a create with ``Prefer: wait=N`` advances it (``tick_seconds`` of real time per
tick) until it is terminal, has its output (``early_output``), ``wait_ticks`` run out, or N seconds pass.
Ticks ``[0, starting_ticks)`` are ``starting``, the next ``processing_ticks`` are ``processing``, then the
scenario's ``outcome``. Pick a scenario with ``fake.scenario`` (default), ``fake.model_scenarios["owner/name"]``
or ``fake.script`` (a queue consumed one per accepted create).

Faults: ``create_errors``/``always_fail_create`` (per scenario), ``fake.poll_errors`` (answers to the next
``GET /v1/predictions/{id}``), ``fake.file_errors``/``fake.always_fail_files`` (the Files API). Hostile mode:
``fake.echo_auth = True`` quotes the request's ``Authorization`` header in every error answer and in a failed
prediction's ``error``, as a misconfigured proxy would; ``fake.foreign_base`` puts another host in ``urls``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .images import color_for, data_uri, ext_for, image_bytes, image_size, load_image_bytes, mime_for
from .server import RecordedRequest, record_request

# Documented fake mapping aspect_ratio -> output pixels.
ASPECT_RATIO_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1360, 768),
    "9:16": (768, 1360),
    "4:3": (1184, 888),
    "3:4": (888, 1184),
    "3:2": (1248, 832),
    "2:3": (832, 1248),
}
MATCH_INPUT_FALLBACK = (1024, 1024)  # match_input_image with no decodable input image
OUTPUT_FORMATS = ("webp", "jpg", "png")
SENSITIVE_ERROR = "The input or output was flagged as sensitive. Please try again with different inputs. (E005)"
NSFW_ERROR = "All generated images contained NSFW content. Try running it again with a different prompt."
TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
PREDICTION_KEYS = frozenset({"input", "webhook", "webhook_events_filter", "stream"})
PREFER_RE = re.compile(r"^wait(=([1-9]|[1-9][0-9]|60))?$")
DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")

PredictionStatus = Literal["starting", "processing", "succeeded", "failed", "canceled", "aborted"]


# --------------------------------------------------------------------------------------------------
# Errors (data) and scenarios


@dataclass(frozen=True)
class ReplicateError:
    """An HTTP error answered as ``application/problem+json``."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def response(self, echo: str | None = None) -> Response:
        """``echo``: a request header value to quote in ``detail`` and ``title`` (hostile upstream mode)."""
        body = dict(self.body)
        if echo is not None:
            body["detail"] = f"{body.get('detail', '')} (request Authorization: {echo})"
            body["title"] = f"{body.get('title', 'Error')} for {echo}"
            body["request"] = {"headers": {"Authorization": echo}}
        return _problem(body, self.status, self.headers)


def unauthenticated() -> ReplicateError:
    return ReplicateError(
        401, {"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401}
    )


def insufficient_credit() -> ReplicateError:
    return ReplicateError(
        402,
        {
            "title": "Insufficient credit",
            "detail": "You have insufficient credit to run this model. Go to https://replicate.com/account/billing"
            "#billing to purchase credit. Once you purchase credit, please wait a few minutes before trying again.",
            "status": 402,
        },
    )


def throttled(retry_after: int = 1, *, header: bool = True) -> ReplicateError:
    """429; ``header=False`` leaves only the body ``retry_after`` (clients must fall back to it)."""
    body = {
        "detail": f"Request was throttled. Your rate limit resets in ~{retry_after}s.",
        "status": 429,
        "retry_after": retry_after,
    }
    return ReplicateError(429, body, {"Retry-After": str(retry_after)} if header else {})


def invalid_fields(fields: list[tuple[str, str, str]]) -> ReplicateError:
    """422 "Input validation failed" from ``(type, field, description)`` triples."""
    detail = "".join(f"- {f}: {d}\n" if f else f"- {d}\n" for _, f, d in fields)
    return ReplicateError(
        422,
        {
            "detail": detail,
            "status": 422,
            "title": "Input validation failed",
            "invalid_fields": [{"type": t, "field": f, "description": d} for t, f, d in fields],
        },
    )


def invalid_aspect_ratio(allowed: tuple[str, ...] = (*ASPECT_RATIO_SIZES, "match_input_image")) -> ReplicateError:
    choices = ", ".join(f'"{a}"' for a in allowed)
    return invalid_fields([("enum", "input.aspect_ratio", f"aspect_ratio must be one of the following: {choices}")])


def server_error(status: int = 500, detail: str = "Internal server error") -> ReplicateError:
    return ReplicateError(status, {"detail": detail, "status": status})


def service_unavailable() -> ReplicateError:
    return server_error(503, "Service Unavailable")


@dataclass
class ReplicateScenario:
    """What Replicate does with one prediction. The default is a quick success."""

    starting_ticks: int = 1  # ticks in "starting" (the plain create response is tick 0)
    processing_ticks: int | None = 1  # then "processing"; None = processing until canceled/deadline
    outcome: Literal["succeeded", "failed", "canceled", "aborted"] = "succeeded"
    error: str = SENSITIVE_ERROR  # the ``error`` text when outcome == "failed"
    output_kind: Literal["list", "string", "data_uri"] = "list"  # https URL list / one URL / data: URI list
    num_outputs: int = 1
    early_output: bool = False  # all files ready while still "processing" (Prefer: wait returns then)
    pending_output: Any = None  # ``output`` before the files are ready ([] mimics replicate-python#397)
    create_errors: list[ReplicateError] = field(default_factory=list)  # answers to the first K creates
    always_fail_create: ReplicateError | None = None
    wait_ticks: int | None = None  # Prefer: wait may advance at most this many ticks (None: no limit)
    tick_seconds: float = 0.01  # real time per tick while a Prefer: wait create is held
    logs: str = "Generating image...\n"
    predict_time: float = 0.1
    creates_seen: int = field(default=0, init=False, repr=False, compare=False)

    @classmethod
    def instant(cls, **kw: Any) -> ReplicateScenario:
        """Terminal already in the create response."""
        return cls(starting_ticks=0, processing_ticks=0, **kw)

    @classmethod
    def hang(cls, **kw: Any) -> ReplicateScenario:
        """Stays processing until canceled (or its Cancel-After deadline)."""
        return cls(starting_ticks=0, processing_ticks=None, **kw)

    @classmethod
    def flagged(cls, **kw: Any) -> ReplicateScenario:
        """Fails with the E005 "flagged as sensitive" error."""
        return cls(outcome="failed", error=SENSITIVE_ERROR, **kw)


# --------------------------------------------------------------------------------------------------
# Recorded state


@dataclass
class Prediction:
    """One accepted prediction. ``input`` is exactly what was sent; ``body`` the whole request body."""

    id: str
    model: str
    version: str
    input: dict[str, Any]
    body: dict[str, Any]
    headers: dict[str, str]
    scenario: ReplicateScenario
    created: datetime
    prefer: str | None
    cancel_after: str | None
    deadline: datetime | None
    ticks: int = 0
    canceled: bool = False
    started_at: datetime | None = None
    completed_at: datetime | None = None
    final_status: PredictionStatus | None = None
    output: Any = None  # generated output value (None until generated)

    def scheduled_status(self) -> PredictionStatus:
        sc = self.scenario
        if self.ticks < sc.starting_ticks:
            return "starting"
        if sc.processing_ticks is None or self.ticks < sc.starting_ticks + sc.processing_ticks:
            return "processing"
        return sc.outcome


@dataclass
class ReplicateFile:
    id: str
    name: str
    content_type: str
    data: bytes
    metadata: Any
    created_at: datetime
    headers: dict[str, str]

    def to_json(self, base: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "content_type": self.content_type,
            "size": len(self.data),
            "etag": hashlib.md5(self.data).hexdigest(),
            "checksums": {
                "sha256": hashlib.sha256(self.data).hexdigest(),
                "md5": hashlib.md5(self.data).hexdigest(),
            },
            "metadata": self.metadata,
            "created_at": _iso(self.created_at, ms=True),
            "expires_at": _iso(self.created_at + timedelta(days=1), ms=True),
            "urls": {"get": f"{base}v1/files/{self.id}"},
        }


class FakeReplicate:
    """Fake Replicate. ``token=None`` disables the ``Authorization: Bearer <token>`` check."""

    def __init__(
        self,
        token: str | None = "r8_test-token",
        scenario: ReplicateScenario | None = None,
        max_file_size: int = 100 * 1024 * 1024,
    ) -> None:
        self.token = token
        self.scenario = scenario or ReplicateScenario()
        self.model_scenarios: dict[str, ReplicateScenario] = {}  # by "owner/name"
        self.script: deque[ReplicateScenario] = deque()  # consumed one per accepted create
        self.max_file_size = max_file_size
        self.validate_input = True  # 422 on a bad aspect_ratio / output_format / missing prompt
        self._lock = threading.Lock()
        self.stopping = threading.Event()  # set by LocalServer.stop: a held Prefer: wait returns at once
        self.reset()
        self.app = Starlette(
            routes=[
                Route("/v1/models/{owner}/{name}/predictions", self._create_model_prediction, methods=["POST"]),
                Route("/v1/predictions", self._create_version_prediction, methods=["POST"]),
                Route("/v1/predictions/{id}", self._get_prediction, methods=["GET"]),
                Route("/v1/predictions/{id}/cancel", self._cancel_prediction, methods=["POST"]),
                Route("/v1/files", self._create_file, methods=["POST"]),
                Route("/v1/files/{id}", self._file, methods=["GET", "DELETE"]),
                Route("/v1/files/{id}/download", self._download_file, methods=["GET"]),
                Route("/files/{name:path}", self._delivery, methods=["GET", "HEAD"]),
            ]
        )
        self.app.state.on_start = self.stopping.clear
        self.app.state.on_stop = self.stopping.set
        self.echo_auth = False  # quote the request's Authorization header in every error answer
        self.foreign_base: str | None = None  # e.g. "http://127.0.0.1:9/": `urls.get`/`urls.cancel` name this host

    def _echo(self, headers: Any) -> str | None:
        return (headers.get("authorization") or "") if self.echo_auth else None

    def reset(self) -> None:
        """Forget every recorded request, prediction, upload and output file (scenarios are kept)."""
        with self._lock:
            self.requests: list[RecordedRequest] = []  # every request, in arrival order
            self.predictions: dict[str, Prediction] = {}
            self.creates: list[Prediction] = []  # accepted creates
            self.rejected_creates: list[RecordedRequest] = []  # creates answered with an error
            self.polls: list[str] = []  # prediction id per GET /v1/predictions/{id}
            self.cancels: list[str] = []  # prediction id per POST .../cancel
            self.uploads: list[ReplicateFile] = []  # Files API uploads (also kept after DELETE)
            self.files: dict[str, ReplicateFile] = {}
            self.outputs: dict[str, tuple[bytes, str]] = {}  # delivery name -> (bytes, content type)
            self.poll_errors: list[ReplicateError] = []  # consumed one per GET /v1/predictions/{id}
            self.file_errors: list[ReplicateError] = []  # consumed one per POST /v1/files
            self.always_fail_files: ReplicateError | None = None

    @property
    def last_create(self) -> Prediction:
        return self.creates[-1]

    # ---- helpers -------------------------------------------------------------------------------

    async def _record(self, request: Request) -> RecordedRequest:
        rec = await record_request(request)
        with self._lock:
            self.requests.append(rec)
        return rec

    def _auth_error(self, request: Request) -> Response | None:
        if self.token is None or request.headers.get("authorization") == f"Bearer {self.token}":
            return None
        return unauthenticated().response()

    def _lookup(self, url: str) -> bytes | None:
        path = urlsplit(url).path
        if path.startswith("/v1/files/"):
            found = self.files.get(path[len("/v1/files/") :].split("/")[0])
            return found.data if found else None
        if path.startswith("/files/"):
            out = self.outputs.get(path[len("/files/") :])
            return out[0] if out else None
        return None

    def _advance(self, pred: Prediction) -> PredictionStatus:
        """Current status; records started/completed timestamps and applies the Cancel-After deadline."""
        if pred.final_status is not None:
            return pred.final_status
        now = datetime.now(UTC)
        status = pred.scheduled_status()
        if pred.canceled or (pred.deadline is not None and now >= pred.deadline):
            started = pred.started_at is not None or status != "starting"
            status = "canceled" if pred.canceled or started else "aborted"
        if status != "starting" and status != "aborted" and pred.started_at is None:
            pred.started_at = now
        if status in TERMINAL:
            pred.final_status = status
            pred.completed_at = now
        return status

    async def _ensure_output(self, pred: Prediction, base: str) -> None:
        if pred.output is not None:
            return
        inp = pred.input
        fmt = inp.get("output_format", "webp")
        fmt = fmt if fmt in OUTPUT_FORMATS else "webp"
        w, h = await self._output_size(inp)
        values = []
        for i in range(pred.scenario.num_outputs):
            data = image_bytes(fmt, w, h, color_for(_seed(inp) + i))
            if pred.scenario.output_kind == "data_uri":
                values.append(data_uri(data, mime_for(fmt)))
                continue
            name = f"{pred.id}/out-{i}.{ext_for(fmt)}"
            with self._lock:
                self.outputs[name] = (data, mime_for(fmt))
            values.append(f"{base}files/{name}")
        pred.output = values[0] if pred.scenario.output_kind == "string" and values else values

    async def _output_size(self, inp: dict[str, Any]) -> tuple[int, int]:
        ratio = inp.get("aspect_ratio") or ("match_input_image" if inp.get("image") else "16:9")
        if ratio in ASPECT_RATIO_SIZES:
            return ASPECT_RATIO_SIZES[ratio]
        image = inp.get("image")
        first = image[0] if isinstance(image, list) and image else image
        if isinstance(first, str):
            data = await load_image_bytes(first, self._lookup)
            dims = image_size(data) if data else None
            if dims:
                return dims
        return MATCH_INPUT_FALLBACK

    async def _to_json(self, pred: Prediction, base: str, status: PredictionStatus) -> dict[str, Any]:
        sc = pred.scenario
        output: Any = None
        if status == "succeeded" or (status == "processing" and sc.early_output):
            await self._ensure_output(pred, base)
            output = pred.output
        elif status in ("starting", "processing"):
            output = sc.pending_output
        terminal = status in TERMINAL
        metrics: dict[str, Any] = {}
        if terminal and pred.completed_at is not None:
            total = round((pred.completed_at - pred.created).total_seconds(), 6)
            metrics = (
                {"total_time": total}
                if status == "aborted"
                else {
                    "predict_time": sc.predict_time,
                    "total_time": total,
                }
            )
        body: dict[str, Any] = {
            "id": pred.id,
            "model": pred.model,
            "version": pred.version,
            "input": pred.input,
            "logs": "" if status in ("starting", "aborted") else sc.logs,
            "output": output,
            "data_removed": False,
            "error": self._failure_text(pred) if status == "failed" else None,
            "status": status,
            "source": "api",
            "created_at": _iso(pred.created),
            "started_at": _iso(pred.started_at) if pred.started_at else None,
            "completed_at": _iso(pred.completed_at) if terminal and pred.completed_at else None,
            "metrics": metrics,
            "urls": {
                "cancel": f"{self.foreign_base or base}v1/predictions/{pred.id}/cancel",
                "get": f"{self.foreign_base or base}v1/predictions/{pred.id}",
                "web": f"https://replicate.com/p/{pred.id}",
            },
        }
        if pred.deadline is not None:
            body["deadline"] = _iso(pred.deadline)
        return body

    def _failure_text(self, pred: Prediction) -> str:
        echo = self._echo(pred.headers)
        return pred.scenario.error if echo is None else f"{pred.scenario.error} [Authorization: {echo}]"

    def _validate_input(self, inp: dict[str, Any]) -> ReplicateError | None:
        if not self.validate_input:
            return None
        problems: list[tuple[str, str, str]] = []
        if "prompt" not in inp:
            problems.append(("required", "input", "prompt is required"))
        ratio = inp.get("aspect_ratio")
        if ratio is not None and ratio not in (*ASPECT_RATIO_SIZES, "match_input_image"):
            choices = ", ".join(f'"{a}"' for a in (*ASPECT_RATIO_SIZES, "match_input_image"))
            problems.append(("enum", "input.aspect_ratio", f"aspect_ratio must be one of the following: {choices}"))
        fmt = inp.get("output_format")
        if fmt is not None and fmt not in OUTPUT_FORMATS:
            choices = ", ".join(f'"{f}"' for f in OUTPUT_FORMATS)
            problems.append(("enum", "input.output_format", f"output_format must be one of the following: {choices}"))
        return invalid_fields(problems) if problems else None

    # ---- predictions -----------------------------------------------------------------------------

    async def _create_model_prediction(self, request: Request) -> Response:
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        return await self._create(request, model, None)

    async def _create_version_prediction(self, request: Request) -> Response:
        return await self._create(request, None, "version")

    async def _create(self, request: Request, model: str | None, needs: str | None) -> Response:
        rec = await self._record(request)
        if (denied := self._auth_error(request)) is not None:
            return denied
        body = rec.json
        if not isinstance(body, dict):
            self.rejected_creates.append(rec)
            return _problem({"detail": "Invalid JSON body", "status": 400, "title": "Bad request"}, 400)
        problems: list[tuple[str, str, str]] = []
        if needs == "version" and "version" not in body:
            problems.append(("required", "", "version is required"))
        if "input" not in body:
            problems.append(("required", "", "input is required"))
        elif not isinstance(body["input"], dict):
            problems.append(
                ("invalid_type", "input", "Invalid type. Expected: object, given: " + type(body["input"]).__name__)
            )
        allowed = PREDICTION_KEYS | ({"version"} if needs == "version" else set())
        problems += [
            ("additional_property_not_allowed", "", f"Additional property {k} is not allowed")
            for k in body
            if k not in allowed
        ]
        if problems:
            self.rejected_creates.append(rec)
            return invalid_fields(problems).response()
        version = "hidden"
        if model is None:
            ref = str(body["version"])
            model, _, version = ref.partition(":") if "/" in ref else ("fake/model", "", ref)
            version = version or "hidden"
        with self._lock:
            scenario = self.script[0] if self.script else self.model_scenarios.get(model, self.scenario)
            attempt = scenario.creates_seen
            scenario.creates_seen += 1
            error = scenario.always_fail_create or (
                scenario.create_errors[attempt] if attempt < len(scenario.create_errors) else None
            )
        if error is None:
            error = self._validate_input(body["input"])
        if error is not None:
            with self._lock:
                self.rejected_creates.append(rec)
            return error.response(self._echo(rec.headers))
        prefer = rec.headers.get("prefer")
        cancel_after = rec.headers.get("cancel-after")
        created = datetime.now(UTC)
        duration = _parse_duration(cancel_after) if cancel_after else None
        pred = Prediction(
            id=_prediction_id(),
            model=model,
            version=version,
            input=body["input"],
            body=body,
            headers=rec.headers,
            scenario=scenario,
            created=created,
            prefer=prefer,
            cancel_after=cancel_after,
            deadline=created + timedelta(seconds=duration) if duration is not None else None,
        )
        with self._lock:
            if self.script and self.script[0] is scenario:
                self.script.popleft()
            self.predictions[pred.id] = pred
            self.creates.append(pred)
        base = str(request.base_url)
        headers = {"ratelimit-remaining": "599", "ratelimit-reset": "1", "Location": f"{base}v1/predictions/{pred.id}"}
        status = self._advance(pred)
        if prefer is not None and PREFER_RE.match(prefer.strip()):
            headers["Preference-Applied"] = prefer.strip()
            status = await self._wait(pred, _wait_seconds(prefer.strip()))
        return JSONResponse(await self._to_json(pred, base, status), 201, headers=headers)

    async def _wait(self, pred: Prediction, seconds: float) -> PredictionStatus:
        sc = pred.scenario
        deadline = time.monotonic() + seconds
        advanced = 0
        status = self._advance(pred)
        while status not in TERMINAL and not (status == "processing" and sc.early_output):
            out_of_ticks = sc.wait_ticks is not None and advanced >= sc.wait_ticks
            if out_of_ticks or time.monotonic() >= deadline or self.stopping.is_set():
                break
            await asyncio.sleep(max(0.0, min(sc.tick_seconds, deadline - time.monotonic())))
            with self._lock:
                if pred.final_status is None and not pred.canceled:
                    pred.ticks += 1
            advanced += 1
            status = self._advance(pred)
        return status

    async def _authorized_prediction(self, request: Request) -> Prediction | Response:
        """Record the request; the prediction it names, or the 401/404 to answer instead."""
        await self._record(request)
        if (denied := self._auth_error(request)) is not None:
            return denied
        pred = self.predictions.get(request.path_params["id"])
        if pred is None:
            return _problem({"detail": "Not found.", "status": 404}, 404)
        return pred

    async def _get_prediction(self, request: Request) -> Response:
        pred = await self._authorized_prediction(request)
        if isinstance(pred, Response):
            return pred
        with self._lock:
            self.polls.append(pred.id)
            error = self.poll_errors.pop(0) if self.poll_errors else None
            if error is None and pred.final_status is None:
                pred.ticks += 1
        if error is not None:
            return error.response(self._echo(request.headers))
        status = self._advance(pred)
        return JSONResponse(await self._to_json(pred, str(request.base_url), status))

    async def _cancel_prediction(self, request: Request) -> Response:
        pred = await self._authorized_prediction(request)
        if isinstance(pred, Response):
            return pred
        with self._lock:
            self.cancels.append(pred.id)
            if pred.final_status is None:
                pred.canceled = True
        status = self._advance(pred)
        return JSONResponse(await self._to_json(pred, str(request.base_url), status))

    # ---- files -----------------------------------------------------------------------------------

    async def _create_file(self, request: Request) -> Response:
        rec = await self._record(request)
        if (denied := self._auth_error(request)) is not None:
            return denied
        with self._lock:
            error = self.always_fail_files or (self.file_errors.pop(0) if self.file_errors else None)
        if error is not None:
            return error.response(self._echo(rec.headers))
        async with request.form() as form:
            content = form.get("content")
            if not isinstance(content, UploadFile):
                return invalid_fields([("required", "", "content is required")]).response()
            data = await content.read()
            if len(data) > self.max_file_size:
                return _problem({"detail": "Files must be less than 100MB in size", "status": 413}, 413)
            meta_raw = form.get("metadata")
            try:
                metadata = json.loads(meta_raw) if isinstance(meta_raw, str) else {}
            except ValueError:
                return invalid_fields([("invalid_json", "metadata", "metadata must be valid JSON")]).response()
            name, ctype = form.get("filename"), form.get("type")
            file = ReplicateFile(
                id=_prediction_id(),
                name=name if isinstance(name, str) and name else (content.filename or "file"),
                content_type=ctype
                if isinstance(ctype, str) and ctype
                else (content.content_type or "application/octet-stream"),
                data=data,
                metadata=metadata,
                created_at=datetime.now(UTC),
                headers=rec.headers,
            )
            with self._lock:
                self.uploads.append(file)
                self.files[file.id] = file
            return JSONResponse(file.to_json(str(request.base_url)), 201)

    async def _file(self, request: Request) -> Response:
        await self._record(request)
        if (denied := self._auth_error(request)) is not None:
            return denied
        file = self.files.get(request.path_params["id"])
        if file is None:
            return _problem({"detail": "File not found"}, 404)
        if request.method == "DELETE":
            with self._lock:
                self.files.pop(file.id, None)
            return Response(status_code=204)
        return JSONResponse(file.to_json(str(request.base_url)))

    async def _download_file(self, request: Request) -> Response:
        await self._record(request)  # real URLs carry owner/expiry/signature query params; not checked
        file = self.files.get(request.path_params["id"])
        if file is None:
            return _problem({"detail": "File not found"}, 404)
        return Response(file.data, media_type=file.content_type)

    async def _delivery(self, request: Request) -> Response:
        await self._record(request)
        found = self.outputs.get(request.path_params["name"])
        if found is None:
            return Response("Not Found", 404, media_type="text/plain")
        return Response(found[0], media_type=found[1])


def _problem(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status, headers=headers, media_type="application/problem+json")


def _prediction_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return "".join(secrets.choice(alphabet) for _ in range(26))


def _iso(ts: datetime, ms: bool = False) -> str:
    return ts.isoformat(timespec="milliseconds" if ms else "microseconds").replace("+00:00", "Z")


def _wait_seconds(prefer: str) -> float:
    _, _, n = prefer.partition("=")
    return float(n) if n else 60.0


def _parse_duration(value: str) -> float | None:
    value = value.strip()
    if value.isdigit():
        return float(value)
    m = DURATION_RE.match(value)
    if not value or m is None:
        return None
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return float(h * 3600 + mi * 60 + s)


def _seed(inp: dict[str, Any]) -> int:
    seed = inp.get("seed")
    return seed if isinstance(seed, int) else 7
