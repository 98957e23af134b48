"""The lean stack of the image routes (`api/hot_routes.py`) answers exactly as FastAPI's does.

Two apps from the same settings, one with `hot_routes` on, one with it off, get the same sequence
of raw ASGI requests; their ASGI messages (status, headers in order, body chunks), their log lines
and their metrics must be the same, once the values that differ between any two runs (job and file
ids, timestamps, durations) are masked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import Depends
from opentelemetry import trace
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from tests.api.conftest import encode
from tests.conftest import _merge, gateway_settings
from tests.fakes.fal import FakeFal, FalScenario, fal_provider_settings, ingress_error
from tests.fakes.server import LocalServer

from imagegate.api import images
from imagegate.api.hot_routes import Gateway, RouteEndpoint
from imagegate.app import create_app
from imagegate.observability.logs import FIELDS_ATTR
from imagegate.settings import Settings

TEAM = "sk-team-compare-0123"
SLOW = "sk-limited-compare-4567"  # rpm 1
OPEN = "sk-open-compare-8901"  # every model
KEYS = [
    {"name": "team", "key": TEAM, "models": ["sandbox-image", "sandbox-edit", "fal-image"]},
    {"name": "limited", "key": SLOW, "rpm": 1},
    {"name": "open", "key": OPEN},
]
MODELS = {
    "fal-image": {"routes": [{"provider": "fal", "model": "fal-ai/qwen-image", "price": {"per_image": 0.03}}]},
    "sandbox-image": {"routes": [{"provider": "sandbox", "model": "sandbox-image", "price": {"per_megapixel": 0.02}}]},
    "sandbox-edit": {"routes": [{"provider": "sandbox", "model": "sandbox-edit"}]},
    "sandbox-other": {"routes": [{"provider": "sandbox", "model": "sandbox-image"}]},
}
GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
PNG = encode("png")

Message = dict[str, Any]


@dataclass
class Req:
    method: str
    path: str
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    query: str = ""
    key: str | None = TEAM
    content_length: bool = True
    disconnect_after: float | None = None  # the client goes away this long after sending the body
    scenario: FalScenario | None = None  # what the fake fal does with it
    before: Callable[[Any], None] | None = None  # called with the app first (e.g. to break the service)
    send_fails: str | None = None  # the server's send raises on this message type (e.g. a bad header)


def gen(body: Any, *, headers: list[tuple[str, str]] = (), **kw: Any) -> Req:  # type: ignore[assignment]
    return Req("POST", GEN, json.dumps(body).encode(), [("content-type", "application/json"), *headers], **kw)


def multipart(fields: dict[str, str], files: dict[str, bytes], **kw: Any) -> Req:
    boundary = "compareboundary123"
    parts = [
        f'--{boundary}\r\ncontent-disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    for name, data in files.items():
        head = f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"; filename="in.png"\r\n'
        parts.append(head.encode() + b"content-type: image/png\r\n\r\n" + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return Req("POST", EDIT, body, [("content-type", f"multipart/form-data; boundary={boundary}")], **kw)


async def exchange(app: Any, req: Req, rid: str) -> list[Message]:
    """One request as uvicorn hands it to the app; every message the app sends."""
    headers = [("host", "gateway"), ("x-request-id", rid), *req.headers]
    if req.key is not None:
        headers.append(("authorization", f"Bearer {req.key}"))
    if req.content_length and req.body:
        headers.append(("content-length", str(len(req.body))))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": "http",
        "path": req.path,
        "raw_path": req.path.encode(),
        "query_string": req.query.encode(),
        "root_path": "",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "state": {},
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }
    sent: list[Message] = []
    done = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        if req.disconnect_after is not None:
            await asyncio.sleep(req.disconnect_after)
        else:
            await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == req.send_fails:
            raise RuntimeError("Invalid HTTP header value.")  # as uvicorn's send, after it counted the start

    try:
        await app(scope, receive, send)
    except Exception as exc:  # what the server would see
        sent.append({"type": "raised", "error": repr(exc)})
    finally:
        done.set()
    return sent


_MASKS = [
    (re.compile(rb"imgjob_[0-9a-f]{24}"), b"imgjob_*"),
    (re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), b"uuid"),  # fal's request ids
    (re.compile(rb"/v1/files/images/[A-Za-z0-9_-]{32}\.(png|jpeg|webp)"), b"/v1/files/images/*"),
    (re.compile(rb'"(created|created_at|expires_at|updated_at|finished_at|started_at)":\s*[0-9.]+'), rb'"\1":0'),
    (re.compile(rb"[0-9]+(\.[0-9]+)?ms"), b"*ms"),
    (re.compile(rb"req_[0-9a-f]{32}"), b"req_*"),  # a request id the gateway made (the tests send theirs)
]


_CLOCKED = frozenset({b"retry-after-ms", b"x-ratelimit-reset-requests", b"x-ratelimit-reset-images"})  # the time left


def mask(data: bytes) -> bytes:
    for pattern, replacement in _MASKS:
        data = pattern.sub(replacement, data)
    return data


def comparable(messages: list[Message]) -> list[Any]:
    out: list[Any] = []
    for m in messages:
        if m["type"] == "http.response.start":
            headers = [(bytes(k), b"*" if bytes(k) in _CLOCKED else mask(bytes(v))) for k, v in m.get("headers", [])]
            out.append(("start", m["status"], headers))
        elif m["type"] == "http.response.body":
            out.append(("body", mask(bytes(m.get("body", b""))), m.get("more_body", False)))
        else:
            out.append((m["type"], m.get("error")))
    return out


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[Any] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = dict(getattr(record, FIELDS_ATTR, None) or {})
        fields.pop("duration_ms", None)
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        masked = mask(json.dumps(fields, sort_keys=True).encode())
        self.lines.append((record.name, record.levelname, mask(record.getMessage().encode()), masked, exc))


@pytest.fixture(scope="module")
def fal() -> Iterator[tuple[FakeFal, LocalServer]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv


def compare_settings(tmp_path: Path, fal_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "auth": {"keys": KEYS},
        "models": MODELS,
        "jobs": {"workers": 0},
        "limits": {"max_body_bytes": 200_000},
        "routing": {"backoff_base": 0.01, "backoff_max": 0.02, "deadline_seconds": 10, "keepalive_seconds": 5},
        "providers": {"fal": fal_provider_settings(fal_url)},
    }
    return gateway_settings(tmp_path, **_merge(base, overrides))


@pytest.fixture
async def run(tmp_path: Path, fal: tuple[FakeFal, LocalServer]) -> AsyncIterator[Callable[..., Any]]:
    """`await run(requests, **settings)`: the answers, logs and metrics of both paths, compared."""
    fake, srv = fal
    logger = logging.getLogger("imagegate")

    async def one(hot: bool, steps: list[Req | list[Req]], overrides: dict[str, Any]) -> Any:
        app = create_app(compare_settings(tmp_path / ("hot" if hot else "fastapi"), srv.url, **overrides))
        assert isinstance(app, Gateway)
        app.hot_routes = hot
        records = Records()
        logger.addHandler(records)
        level = logger.level
        logger.setLevel(logging.DEBUG)
        answers: list[Any] = []
        through_fastapi: list[tuple[str, str]] = []
        fastapi_stack = app.build_middleware_stack()

        async def counted(scope: Any, receive: Any, send: Any) -> None:
            through_fastapi.append((scope["method"], scope["path"]))
            await fastapi_stack(scope, receive, send)

        app.middleware_stack = counted
        try:
            async with app.router.lifespan_context(app):
                for i, step in enumerate(steps):
                    group = step if isinstance(step, list) else [step]
                    tasks = []
                    for j, req in enumerate(group):
                        fake.scenario = req.scenario or FalScenario.instant()
                        if req.before is not None:
                            req.before(app)
                        tasks.append(asyncio.ensure_future(exchange(app, req, f"req-{i}-{j}")))
                        await asyncio.sleep(0.05 if len(group) > 1 else 0)  # concurrent, in a known order
                    answers.extend(comparable(m) for m in await asyncio.gather(*tasks))
        finally:
            logger.removeHandler(records)
            logger.setLevel(level)
        samples = sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for metric in app.state.metrics.registry.collect()
            for s in metric.samples
            if not s.name.endswith(("_bucket", "_sum", "_created"))
        )
        image_posts = [("POST", r.path) for r in _flat(steps) if r.method == "POST" and r.path in (GEN, EDIT)]
        reached = [seen for seen in through_fastapi if seen in image_posts]
        assert len(reached) == (0 if hot else len(image_posts))  # the lean stack served them, or FastAPI did
        return answers, records.lines, samples

    async def compare(steps: list[Req | list[Req]], **overrides: Any) -> list[Any]:
        hot = await one(True, steps, overrides)
        slow = await one(False, steps, overrides)
        for i, (a, b) in enumerate(zip(hot[0], slow[0], strict=True)):
            assert a == b, f"request {i}"
        assert hot[1] == slow[1]
        assert hot[2] == slow[2]
        return hot[0]

    yield compare


def _flat(steps: list[Req | list[Req]]) -> list[Req]:
    return [r for step in steps for r in (step if isinstance(step, list) else [step])]


def status_of(answer: list[Any]) -> int | None:
    return next((entry[1] for entry in answer if entry[0] == "start"), None)


def _boom(app: Any) -> None:
    class Broken:
        async def run(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("boom")

    app.state.service = Broken()


async def test_generations_and_edits_answer_as_through_fastapi(run: Callable[..., Any]) -> None:
    data_uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    steps: list[Req | list[Req]] = [
        gen({"model": "sandbox-image", "prompt": "a red fox", "response_format": "b64_json", "size": "64x64"}),
        gen({"model": "sandbox-image", "prompt": "a red fox", "response_format": "url", "size": "64x64"}),
        gen({"model": "sandbox-image", "prompt": "dry", "size": "64x64"}, headers=[("x-imagegate-dry-run", "1")]),
        gen({"model": "sandbox-image", "prompt": "dry"}, query="dry_run=true&route=0"),
        gen({"model": "sandbox-image", "prompt": "sse", "stream": True, "size": "64x64"}),
        gen({"model": "sandbox-image", "prompt": "job", "size": "64x64"}, headers=[("prefer", "respond-async")]),
        gen({"model": "sandbox-image", "prompt": "once", "size": "64x64"}, headers=[("idempotency-key", "k-1")]),
        gen({"model": "sandbox-image", "prompt": "once", "size": "64x64"}, headers=[("idempotency-key", "k-1")]),
        gen({"model": "sandbox-image", "prompt": "other", "size": "64x64"}, headers=[("idempotency-key", "k-1")]),
        gen({"model": "fal-image", "prompt": "via fal", "response_format": "url"}),
        gen({"model": "fal-image", "prompt": "nope"}, scenario=FalScenario.content_policy()),
        gen({"model": "fal-image", "prompt": "down"}, scenario=FalScenario(always_fail_submit=ingress_error(502))),
        multipart({"model": "sandbox-edit", "prompt": "invert", "response_format": "b64_json"}, {"image": PNG}),
        multipart({"model": "sandbox-edit", "prompt": "no image"}, {}),
        multipart({"model": "sandbox-edit", "prompt": "two masks"}, {"image": PNG, "mask": b"not an image"}),
        Req("POST", EDIT, b"--x\r\nbroken", [("content-type", "multipart/form-data; boundary=x")]),
        Req(
            "POST",
            EDIT,
            json.dumps({"model": "sandbox-edit", "prompt": "j", "images": [{"image_url": data_uri}]}).encode(),
            [("content-type", "application/json")],
        ),
    ]
    answers = await run(steps)
    assert [status_of(a) for a in answers] == [
        200,
        200,
        200,
        200,
        200,
        202,
        200,
        200,
        409,
        200,
        400,
        503,
        200,
        400,
        400,
        400,
        200,
    ]


async def test_refusals_and_errors_answer_as_through_fastapi(run: Callable[..., Any]) -> None:
    body = {"model": "sandbox-image", "prompt": "x", "size": "64x64"}
    steps: list[Req | list[Req]] = [
        gen(body, key=None),
        gen(body, key="sk-wrong"),
        gen(body, key=None, headers=[("authorization", "Basic dXNlcjpwYXNz")]),
        gen({**body, "model": "sandbox-other"}),
        gen({**body, "model": "no-such-model"}, key=OPEN),
        Req("POST", GEN, b"{not json", [("content-type", "application/json")]),
        Req("POST", GEN, b"", [("content-type", "application/json")]),
        gen([1, 2]),
        gen({**body, "n": "many"}),
        gen({**body, "size": "huge"}),
        gen(body, headers=[("x-imagegate-route", "7")]),
        gen(body, key=SLOW),
        gen(body, key=SLOW),
        gen(body, before=_boom),
        Req(
            "POST",
            GEN,
            b"{}",
            [("content-type", "application/json"), ("content-length", "999999999")],
            content_length=False,
        ),
        Req("POST", GEN, b"x" * 250_000, [("content-type", "application/json")], content_length=False),
        Req(
            "POST", GEN, b"{}", [("content-type", "application/json"), ("content-length", "12x")], content_length=False
        ),
    ]
    answers = await run(steps)
    assert [status_of(a) for a in answers] == [
        401,
        401,
        401,
        403,
        404,
        400,
        400,
        400,
        400,
        400,
        400,
        200,
        429,
        500,
        413,
        413,
        400,
    ]


async def test_other_methods_and_paths_are_left_to_fastapi(run: Callable[..., Any]) -> None:
    steps: list[Req | list[Req]] = [
        Req("GET", GEN),
        Req("HEAD", EDIT),
        Req("PUT", GEN, b"{}"),
        Req("POST", GEN + "/", b"{}"),
        Req("POST", "/v1/images/variations", b"{}"),
        Req("POST", "/v1/images/generations/extra", b"{}"),
    ]
    answers = await run(steps)
    assert [status_of(a) for a in answers] == [405, 405, 405, status_of(answers[3]), 404, 404]


async def test_busy_and_disconnected_requests_answer_as_through_fastapi(run: Callable[..., Any]) -> None:
    body = {"model": "sandbox-image", "prompt": "slow", "size": "64x64"}
    steps: list[Req | list[Req]] = [
        [gen(body), gen(body)],  # the second finds the budget spent
        gen(body, disconnect_after=0.05),
    ]
    answers = await run(
        steps,
        limits={"max_inflight_requests": 1, "queue_timeout_seconds": 0},
        providers={"sandbox": {"delay_seconds": 0.3}},
    )
    assert [status_of(a) for a in answers] == [200, 503, 499]


async def test_errors_after_the_response_started_are_handled_as_through_fastapi(run: Callable[..., Any]) -> None:
    """FastAPI's outermost ServerErrorMiddleware hands an error raised after the response started to
    the app's 500 handler too (its log line) before re-raising it to the server."""
    body = {"model": "sandbox-image", "prompt": "x", "size": "64x64"}
    steps: list[Req | list[Req]] = [
        gen(body, send_fails="http.response.start"),
        gen(body, send_fails="http.response.body"),
        gen({**body, "stream": True}, send_fails="http.response.body"),
    ]
    answers = await run(steps)
    assert all(answer[-1][0] == "raised" for answer in answers)


async def test_an_error_in_the_outermost_middleware_is_answered_as_through_fastapi(
    run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raised outside the request middleware (here, by observability), FastAPI's ServerErrorMiddleware
    answers with the app's 500 handler, then re-raises to the server."""

    def broken(state: Any = None) -> Any:
        raise RuntimeError("telemetry broke")

    monkeypatch.setattr("imagegate.core.telemetry.begin", broken)
    answers = await run([gen({"model": "sandbox-image", "prompt": "x", "size": "64x64"})])
    assert status_of(answers[0]) == 500 and answers[0][-1][0] == "raised"


def _bare_gateway(
    include: dict[str, Any], *, before: Callable[[Gateway], None] | None = None, **kwargs: Any
) -> tuple[Gateway, list[str]]:
    """A Gateway with the image routes (no app state; `before` adds routes ahead of them); records
    what reached FastAPI's stack."""
    app = Gateway(**kwargs)
    if before is not None:
        before(app)
    app.include_router(images.router, **include)
    reached: list[str] = []
    fastapi_stack = app.build_middleware_stack()

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await fastapi_stack(scope, receive, send)

    app.middleware_stack = counted
    return app, reached


@pytest.mark.filterwarnings("ignore:The `root_path` parameter is deprecated")
@pytest.mark.parametrize(
    ("kwargs", "include", "root_path", "lean"),
    [
        ({}, {}, "", True),
        ({}, {}, "/gateway", False),  # a root path: FastAPI's router strips it
        ({"root_path": "/gateway"}, {}, "", False),
        ({"max_body_size": 1000}, {}, "", False),  # FastAPI's own body limit applies
        ({"telemetry": {"tracer_provider": trace.NoOpTracerProvider()}}, {}, "", False),  # FastAPI traces requests
        ({}, {"prefix": "/api"}, "", False),  # no image route at that path
        ({}, {"dependencies": [Depends(lambda: None)]}, "", False),  # FastAPI resolves them
        ({}, {"max_body_size": 1000}, "", False),
    ],
)
async def test_the_lean_stack_only_serves_what_fastapi_would_serve_alike(
    kwargs: dict[str, Any], include: dict[str, Any], root_path: str, lean: bool
) -> None:
    app, reached = _bare_gateway(include, **kwargs)
    req = Req("POST", GEN, b"[]", [("content-type", "application/json")])
    messages: list[Message] = []
    scope = {"type": "http", "method": "POST", "path": GEN, "root_path": root_path, "headers": [],
             "query_string": b"", "state": {}}  # fmt: skip

    async def receive() -> Message:
        return {"type": "http.request", "body": req.body, "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    with contextlib.suppress(Exception):  # no app state here: the endpoint fails either way
        await app(scope, receive, send)
    assert reached == ([] if lean else [GEN])


async def _other_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _mount_ahead(app: Gateway) -> None:
    app.mount("/v1", _other_app)


def _template_ahead(app: Gateway) -> None:
    @app.post("/v1/images/{operation}")
    async def other(operation: str) -> dict[str, str]:
        return {"operation": operation}


@pytest.mark.parametrize("ahead", [_mount_ahead, _template_ahead])
async def test_a_route_registered_before_that_takes_the_path_keeps_fastapis_path(
    ahead: Callable[[Gateway], None],
) -> None:
    """FastAPI picks the first route that matches POST on the path, whatever its template: a mount
    or a path parameter ahead of the image routes takes their requests on both stacks."""
    app, reached = _bare_gateway({}, before=ahead)
    messages: list[Message] = []
    scope = {"type": "http", "method": "POST", "path": GEN, "root_path": "", "headers": [],
             "query_string": b"", "state": {}}  # fmt: skip

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    await app(scope, receive, send)
    assert reached == [GEN]
    assert messages[0]["status"] in (200, 204)


class _Handled(Exception):
    pass


@pytest.mark.parametrize("kind", ["plain", "streaming"])
@pytest.mark.parametrize("fails", ["http.response.start", "http.response.body", None])
async def test_route_endpoint_knows_whether_the_response_started(kind: str, fails: str | None) -> None:
    """A handled error raised while the response is sent (at its start too) is Starlette's
    RuntimeError, for a plain response (sent without a `send` wrapper) as for any other; one raised
    by the endpoint is answered by the handler."""
    async def chunks() -> AsyncIterator[bytes]:
        yield b"ok"

    async def endpoint(request: Any) -> Response:
        if fails is None:
            raise _Handled
        return PlainTextResponse("ok") if kind == "plain" else StreamingResponse(chunks())

    async def handler(request: Any, exc: Exception) -> Response:
        return PlainTextResponse("handled", status_code=418)

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == fails:
            raise _Handled
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(10)  # no disconnect while the response is sent
        return {"type": "http.disconnect"}

    route = RouteEndpoint(endpoint, handlers={_Handled: handler}, status_handlers={})
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
    if fails is None:
        await route(scope, receive, send)
        assert sent[0]["status"] == 418
    else:
        with pytest.raises(RuntimeError, match="response already started"):
            await route(scope, receive, send)
