"""Secrets never leave, whatever the upstream says.

Every error path of every adapter is driven against upstreams on 127.0.0.1 that quote the request's
`Authorization` header back (in JSON details, titles, HTML pages, failed-prediction errors): the
configured fal key (id:secret), Replicate token and OpenAI key must appear in no response body, no
response header and no log line (captured at DEBUG, every logger), and no message may carry Python
internals.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tests.conftest import gateway_settings
from tests.fakes.fal import (
    FakeFal,
    FalError,
    FalScenario,
    content_policy_violation,
    ingress_error,
    platform_error,
    validation_error,
)
from tests.fakes.images import png_bytes
from tests.fakes.replicate import (
    FakeReplicate,
    ReplicateError,
    ReplicateScenario,
    insufficient_credit,
    server_error,
    throttled,
)
from tests.fakes.server import LocalServer

from imagegate.app import create_app

FAL_KEY_ID = "5b1c2f3e-9a8b-4c7d-8e6f-0a1b2c3d4e5f"
FAL_KEY_SECRET = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
REPLICATE_TOKEN = "r8_Qz8XyW7vU6tS5rR4qP3oN2mL1kJ0iH9gF"
OPENAI_KEY = "sk-proj-4HqZ9mXv2LcT8nRw6YbK1dPj"
SECRETS = (FAL_KEY_ID, FAL_KEY_SECRET, REPLICATE_TOKEN, OPENAI_KEY)
HTML_500 = "<html><head><title>500 Internal Server Error</title></head><body><h1>oops</h1></body></html>"


class EchoOpenAI:
    """An OpenAI-compatible upstream whose every answer is `self.answer(authorization)`."""

    def __init__(self) -> None:
        self.answer: Callable[[str], Response] = lambda auth: JSONResponse({"data": []})
        self.calls = 0
        self.app = Starlette(routes=[Route("/v1/images/generations", self._generate, methods=["POST"])])

    async def _generate(self, request: Request) -> Response:
        self.calls += 1
        await request.body()
        return self.answer(request.headers.get("authorization", ""))


def envelope(status: int, auth: str, **error: Any) -> JSONResponse:
    body = {"error": {"message": f"Incorrect request, you sent Authorization: {auth}", "type": "x", **error}}
    return JSONResponse(body, status)


OPENAI_ANSWERS: dict[str, tuple[Callable[[str], Response], int]] = {
    "400": (lambda a: envelope(400, a, param=a, code="invalid_value"), 400),
    "401": (lambda a: envelope(401, a, code="invalid_api_key"), 502),
    "429": (lambda a: envelope(429, a, code="rate_limit_exceeded"), 429),
    "500": (lambda a: envelope(500, a, code=a.split()[-1]), 502),
    "503": (lambda a: envelope(503, a), 503),
    "html-502": (lambda a: Response(f"<html><title>Bad gateway {a}</title><body>{a}</body></html>", 502,
                                    media_type="text/html"), 502),
    "not-json": (lambda a: Response(f"upstream said {a}", 200, media_type="text/plain"), 502),
    "not-an-image": (lambda a: JSONResponse({"data": [{"b64_json": "bm90IGFuIGltYWdl"}]}), 502),
}


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeFal, FakeReplicate, EchoOpenAI, dict[str, str]]]:
    fal = FakeFal(key=f"{FAL_KEY_ID}:{FAL_KEY_SECRET}")
    replicate = FakeReplicate(token=REPLICATE_TOKEN)
    oai = EchoOpenAI()
    with LocalServer(fal.app) as fs, LocalServer(replicate.app) as rs, LocalServer(oai.app) as os_:
        yield fal, replicate, oai, {"fal": fs.url, "replicate": rs.url, "openai": os_.url}


@pytest.fixture
async def gateway(
    tmp_path: Path, upstreams: tuple[FakeFal, FakeReplicate, EchoOpenAI, dict[str, str]]
) -> AsyncIterator[httpx.AsyncClient]:
    fal, replicate, _, urls = upstreams
    fal.reset()
    replicate.reset()
    fal.echo_auth = replicate.echo_auth = True
    settings = gateway_settings(
        tmp_path,
        routing={"deadline_seconds": 15, "max_attempts": 2, "backoff_base": 0.01, "backoff_max": 0.02},
        models={
            "fal-q": {"routes": [{"provider": "fal", "model": "fal-ai/qwen-image"}]},
            "fal-s": {"routes": [{"provider": "fal", "model": "fal-ai/qwen-image", "options": {"mode": "sync"}}]},
            "rep": {"routes": [{"provider": "replicate", "model": "qwen/qwen-image"}]},
            "rep-edit": {"routes": [{"provider": "replicate", "model": "qwen/qwen-image-edit-2511",
                                     "options": {"inline_max_bytes": 100}}]},
            "oai": {"routes": [{"provider": "openai", "model": "gpt-image-1"}]},
        },
        providers={
            "fal": {"key_id": FAL_KEY_ID, "key_secret": FAL_KEY_SECRET, "queue_url": urls["fal"],
                    "run_url": urls["fal"] + "/sync", "rest_url": urls["fal"], "poll_interval": 0.01,
                    "poll_max_interval": 0.02, "status_stream": False},  # errors are injected into polls
            "replicate": {"api_token": REPLICATE_TOKEN, "base_url": urls["replicate"] + "/v1", "wait_seconds": 1,
                          "poll_interval": 0.01, "poll_max_interval": 0.02},
            "openai": {"api_key": OPENAI_KEY, "base_url": urls["openai"] + "/v1"},
        },
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30
    ) as client:
        yield client


def assert_leaks_nothing(response: httpx.Response, logs: str) -> None:
    shown = [response.text, *(f"{key}: {value}" for key, value in response.headers.multi_items()), logs]
    for secret in SECRETS:
        for text in shown:
            assert secret not in text
    assert " at 0x" not in response.text and "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and len(error["message"]) <= 600


def fal_scenarios() -> dict[str, tuple[str, FalScenario, int]]:
    html_500 = FalError(500, HTML_500, with_request_id=False)
    return {
        "queue-submit-500": ("fal-q", FalScenario(always_fail_submit=platform_error(500, "internal_error", "boom")),
                             502),
        "queue-submit-422": ("fal-q", FalScenario(always_fail_submit=validation_error("prompt", "bad prompt")), 400),
        "queue-submit-html": ("fal-q", FalScenario(always_fail_submit=ingress_error(502)), 503),
        "queue-status-400": ("fal-q", FalScenario(always_fail_status=FalError(400, {"detail": "bad status"})), 400),
        "queue-result-500": ("fal-q", FalScenario.instant(
            result_error=platform_error(500, "runner_server_error", "Runner crashed")), 503),
        "queue-result-422": ("fal-q", FalScenario.instant(result_error=content_policy_violation()), 400),
        "queue-result-html": ("fal-q", FalScenario.instant(result_error=html_500), 502),
        "queue-failed-result": ("fal-q", FalScenario.runner_disconnected(queue_polls=0, progress_polls=0), 503),
        "queue-not-an-image": ("fal-q", FalScenario.instant(output_bytes=b"<html>not an image</html>"), 502),
        "sync-500": ("fal-s", FalScenario(result_error=platform_error(500, "runner_server_error", "crash")), 503),
        "sync-422": ("fal-s", FalScenario(result_error=validation_error("image_size", "too big")), 400),
        "sync-html": ("fal-s", FalScenario(always_fail_submit=ingress_error(503)), 503),
        "sync-html-500": ("fal-s", FalScenario(result_error=html_500), 502),
        "sync-failed-result": ("fal-s", FalScenario(result_error=platform_error(500, "internal_error", "x")), 502),
    }


@pytest.mark.parametrize("case", list(fal_scenarios()))
async def test_fal_error_paths_leak_nothing(
    case: str, gateway: httpx.AsyncClient, upstreams: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fal = upstreams[0]
    model, fal.scenario, status = fal_scenarios()[case]
    response = await gateway.post("/v1/images/generations", json={"model": model, "prompt": "p", "size": "64x64"})
    assert response.status_code == status, response.text
    assert fal.requests and all(r.headers.get("authorization") == f"Key {FAL_KEY_ID}:{FAL_KEY_SECRET}"
                                for r in fal.requests if not r.path.startswith("/files/"))
    assert_leaks_nothing(response, caplog.text)


def replicate_cases() -> dict[str, tuple[str, ReplicateScenario, dict[str, Any], int]]:
    too_large = ReplicateError(413, {"detail": "Files must be less than 100MB in size", "status": 413})
    return {
        "create-402": ("rep", ReplicateScenario(always_fail_create=insufficient_credit()), {}, 402),
        "create-429": ("rep", ReplicateScenario(always_fail_create=throttled(0)), {}, 429),
        "create-500": ("rep", ReplicateScenario(always_fail_create=server_error(500)), {}, 502),
        "create-401": ("rep", ReplicateScenario(always_fail_create=ReplicateError(
            401, {"title": "Unauthenticated", "detail": "bad token", "status": 401})), {}, 502),
        "failed-prediction": ("rep", ReplicateScenario.instant(outcome="failed", error="CUDA OOM"), {}, 502),
        "failed-e1000": ("rep", ReplicateScenario.instant(outcome="failed", error="Unknown error (E1000)"), {}, 503),
        "flagged": ("rep", ReplicateScenario.flagged(starting_ticks=0, processing_ticks=0), {}, 400),
        "poll-400": ("rep", ReplicateScenario(wait_ticks=0), {"poll_errors": [server_error(400, "bad poll")]}, 502),
        "files-500": ("rep-edit", ReplicateScenario(), {"always_fail_files": server_error(500, "storage")}, 503),
        "files-413": ("rep-edit", ReplicateScenario(), {"always_fail_files": too_large}, 413),
    }


@pytest.mark.parametrize("case", list(replicate_cases()))
async def test_replicate_error_paths_leak_nothing(
    case: str, gateway: httpx.AsyncClient, upstreams: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    replicate = upstreams[1]
    model, replicate.scenario, faults, status = replicate_cases()[case]
    for name, value in faults.items():
        setattr(replicate, name, value)
    try:
        if model == "rep-edit":
            files = {"image": ("a.png", png_bytes(64, 48), "image/png")}
            response = await gateway.post("/v1/images/edits", data={"model": model, "prompt": "p"}, files=files)
        else:
            response = await gateway.post("/v1/images/generations", json={"model": model, "prompt": "p"})
    finally:
        replicate.always_fail_files, replicate.poll_errors = None, []
    assert response.status_code == status, response.text
    assert replicate.requests
    assert_leaks_nothing(response, caplog.text)


@pytest.mark.parametrize("case", list(OPENAI_ANSWERS))
async def test_openai_upstream_error_paths_leak_nothing(
    case: str, gateway: httpx.AsyncClient, upstreams: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    oai: EchoOpenAI = upstreams[2]
    oai.answer, status = OPENAI_ANSWERS[case]
    response = await gateway.post("/v1/images/generations", json={"model": "oai", "prompt": "p"})
    assert response.status_code == status, response.text
    assert_leaks_nothing(response, caplog.text)
    if case == "400":
        assert response.json()["error"]["param"] is None  # an upstream `param` that carries a key is dropped


def test_the_echoing_upstreams_really_echo(upstreams: Any) -> None:
    """The fakes above would make every test pass vacuously if they did not quote the header."""
    fal, replicate, _, urls = upstreams
    fal.echo_auth = replicate.echo_auth = True
    fal.scenario = FalScenario(always_fail_submit=ingress_error(502))
    replicate.scenario = ReplicateScenario(always_fail_create=server_error(500))
    auth = f"Key {FAL_KEY_ID}:{FAL_KEY_SECRET}"
    page = httpx.post(urls["fal"] + "/fal-ai/qwen-image", json={"prompt": "p"}, headers={"Authorization": auth})
    assert FAL_KEY_SECRET in page.text and "<title>" in page.text
    problem = httpx.post(urls["replicate"] + "/v1/models/qwen/qwen-image/predictions", json={"input": {}},
                         headers={"Authorization": f"Bearer {REPLICATE_TOKEN}"})
    assert REPLICATE_TOKEN in problem.json()["detail"] and REPLICATE_TOKEN in problem.json()["title"]
