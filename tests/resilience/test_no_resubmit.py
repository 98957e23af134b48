"""A job the provider took is never submitted again.

The gateway runs under uvicorn on 127.0.0.1 in front of the fal and Replicate fakes, and is called with
the official openai SDK and its DEFAULT retries (2). Under every fault sequence the fakes count the jobs
they accepted: a refused submit may be retried, an accepted job is submitted exactly once, every 5xx
after accepted work carries `x-should-retry: false`, and the next route is tried after an accepted job
only when `routing.fallback_after_accepted` is on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tests.conftest import gateway_settings
from tests.fakes.fal import FakeFal, FalError, FalScenario, ingress_error, platform_error
from tests.fakes.replicate import FakeReplicate, ReplicateError, ReplicateScenario, server_error, throttled
from tests.fakes.server import LocalServer, wait_until

from imagegate.app import create_app

RUNNER_SERVER_ERROR = platform_error(500, "runner_server_error", "Runner crashed")


class CountingOpenAI:
    """An OpenAI-compatible upstream that counts calls and answers `self.answer()`."""

    def __init__(self) -> None:
        self.calls = 0
        self.answer: Callable[[], Response] = lambda: JSONResponse({"error": {"message": "boom"}}, 500)
        self.app = Starlette(routes=[Route("/v1/images/generations", self._generate, methods=["POST"])])

    async def _generate(self, request: Request) -> Response:
        self.calls += 1
        await request.body()
        return self.answer()


Upstreams = tuple[FakeFal, FakeReplicate, CountingOpenAI, dict[str, str]]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    fal, replicate, oai = FakeFal(), FakeReplicate(), CountingOpenAI()
    with LocalServer(fal.app) as fs, LocalServer(replicate.app) as rs, LocalServer(oai.app) as os_:
        yield fal, replicate, oai, {"fal": fs.url, "replicate": rs.url, "openai": os_.url}


def start_gateway(tmp_path: Path, upstreams: Upstreams, *, fallback_after_accepted: bool = False) -> LocalServer:
    fal, replicate, oai, urls = upstreams
    fal.reset()
    replicate.reset()
    oai.calls = 0
    fal.scenario, replicate.scenario = FalScenario.instant(), ReplicateScenario.instant()
    fal.script.clear()
    replicate.script.clear()
    fal_route = {"provider": "fal", "model": "fal-ai/qwen-image"}
    rep_route = {"provider": "replicate", "model": "qwen/qwen-image"}
    settings = gateway_settings(
        tmp_path,
        routing={"deadline_seconds": 20, "max_attempts": 3, "backoff_base": 0.01, "backoff_max": 0.02,
                 "fallback_after_accepted": fallback_after_accepted},
        models={
            "fal-q": {"routes": [fal_route]},
            "fal-s": {"routes": [{**fal_route, "options": {"mode": "sync"}}]},
            "rep": {"routes": [rep_route]},
            "oai": {"routes": [{"provider": "openai", "model": "gpt-image-1"}]},
            "fal-then-rep": {"routes": [fal_route, rep_route]},
            "slow-fal-then-rep": {"routes": [{**fal_route, "timeout_seconds": 1.0}, rep_route]},
        },
        providers={
            "fal": {"key": "test-fal-key", "queue_url": urls["fal"], "run_url": urls["fal"] + "/sync",
                    "rest_url": urls["fal"], "poll_interval": 0.01, "poll_max_interval": 0.02,
                    "status_stream": False},  # status errors are injected into polls
            "replicate": {"api_token": "r8_test-token", "base_url": urls["replicate"] + "/v1", "wait_seconds": 1,
                          "poll_interval": 0.01, "poll_max_interval": 0.02},
            "openai": {"api_key": "sk-test-key-123456", "base_url": urls["openai"] + "/v1"},
        },
    )
    return LocalServer(create_app(settings)).start()


@pytest.fixture
def gateway(tmp_path: Path, upstreams: Upstreams) -> Iterator[str]:
    server = start_gateway(tmp_path, upstreams)
    try:
        yield server.url
    finally:
        server.stop()


def sdk(url: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=30)
    assert client.max_retries == 2  # the SDK's default: every failure it retries would be a new job
    return client


def generate(url: str, model: str, **fields: Any) -> Any:
    return sdk(url).images.generate(model=model, prompt="a cat", response_format="b64_json", **fields)


def fails_without_retry(url: str, model: str, status: int, **fields: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        generate(url, model, **fields)
    assert info.value.status_code == status
    assert info.value.response.headers.get("x-should-retry") == "false"
    return info.value


# ---- fal queue ---------------------------------------------------------------------------------------


def test_refused_submits_are_retried_and_the_job_runs_once(gateway: str, upstreams: Upstreams) -> None:
    fal = upstreams[0]
    fal.scenario = FalScenario.instant(submit_errors=[ingress_error(502), ingress_error(503)])
    assert generate(gateway, "fal-q").data
    assert len(fal.rejected_submits) == 2 and len(fal.submits) == 1


def test_a_transient_status_error_after_acceptance_is_polled_again_not_resubmitted(
    gateway: str, upstreams: Upstreams
) -> None:
    fal = upstreams[0]
    fal.scenario = FalScenario.instant(status_errors=[FalError(500, {"detail": "hiccup"})])
    assert generate(gateway, "fal-q").data
    assert len(fal.submits) == 1 and len(fal.status_polls) >= 2


def test_status_failure_after_acceptance_is_one_submit_and_a_cancel(gateway: str, upstreams: Upstreams) -> None:
    fal = upstreams[0]
    fal.scenario = FalScenario(always_fail_status=FalError(404, {"detail": "Request not found"}))
    fails_without_retry(gateway, "fal-q", 502)
    assert len(fal.submits) == 1
    assert wait_until(lambda: fal.cancels == [fal.last_submit.request_id], timeout=5)


def test_result_500_after_acceptance_is_one_submit_whatever_the_sdk_retries(
    gateway: str, upstreams: Upstreams
) -> None:
    fal = upstreams[0]
    fal.scenario = FalScenario.instant(result_error=RUNNER_SERVER_ERROR)  # every job fails at its result step
    error = fails_without_retry(gateway, "fal-q", 503)
    assert error.code == "provider_unavailable"
    assert len(fal.submits) == 1 and fal.rejected_submits == []


def test_an_accepted_job_does_not_fall_back_by_default(gateway: str, upstreams: Upstreams) -> None:
    fal, replicate = upstreams[0], upstreams[1]
    fal.scenario = FalScenario.instant(result_error=RUNNER_SERVER_ERROR)
    fails_without_retry(gateway, "fal-then-rep", 503)
    assert len(fal.submits) == 1 and replicate.creates == [] and replicate.rejected_creates == []


def test_fallback_after_acceptance_when_the_operator_opts_in(tmp_path: Path, upstreams: Upstreams) -> None:
    fal, replicate = upstreams[0], upstreams[1]
    server = start_gateway(tmp_path, upstreams, fallback_after_accepted=True)
    try:
        fal.scenario = FalScenario.instant(result_error=RUNNER_SERVER_ERROR)
        raw = sdk(server.url).images.with_raw_response.generate(model="fal-then-rep", prompt="x",
                                                               response_format="b64_json")
        assert raw.headers["x-imagegate-provider"] == "replicate"
        assert len(fal.submits) == 1 and len(replicate.creates) == 1  # each job once, on each route
    finally:
        server.stop()


def test_a_route_timeout_after_acceptance_cancels_and_does_not_fall_back(gateway: str, upstreams: Upstreams) -> None:
    fal, replicate = upstreams[0], upstreams[1]
    fal.scenario = FalScenario.hang()
    error = fails_without_retry(gateway, "slow-fal-then-rep", 504)
    assert error.code == "upstream_timeout"
    assert len(fal.submits) == 1 and replicate.creates == []
    assert wait_until(lambda: fal.cancels == [fal.last_submit.request_id], timeout=5)


def test_refused_submits_still_fall_back(gateway: str, upstreams: Upstreams) -> None:
    fal, replicate = upstreams[0], upstreams[1]
    fal.scenario = FalScenario(always_fail_submit=ingress_error(503))
    raw = sdk(gateway).images.with_raw_response.generate(model="fal-then-rep", prompt="x", response_format="b64_json")
    assert raw.headers["x-imagegate-provider"] == "replicate"
    assert fal.submits == [] and len(fal.rejected_submits) == 3 and len(replicate.creates) == 1


# ---- fal sync ----------------------------------------------------------------------------------------


def test_sync_run_answering_500_ran_once(gateway: str, upstreams: Upstreams) -> None:
    fal = upstreams[0]
    fal.scenario = FalScenario(result_error=RUNNER_SERVER_ERROR)
    fails_without_retry(gateway, "fal-s", 503)
    assert len(fal.runs) == 1 and fal.submits == []


def test_sync_run_refused_by_the_ingress_is_retried(gateway: str, upstreams: Upstreams) -> None:
    fal = upstreams[0]
    fal.scenario = FalScenario(submit_errors=[ingress_error(503)])
    assert generate(gateway, "fal-s").data
    assert len(fal.runs) == 1 and len(fal.rejected_submits) == 1


# ---- Replicate ---------------------------------------------------------------------------------------


def test_failed_prediction_is_created_once(gateway: str, upstreams: Upstreams) -> None:
    replicate = upstreams[1]
    replicate.scenario = ReplicateScenario.instant(outcome="failed", error="Unknown error (E1000)")
    fails_without_retry(gateway, "rep", 503)
    assert len(replicate.creates) == 1


def test_poll_failure_after_creation_is_one_prediction_and_a_cancel(gateway: str, upstreams: Upstreams) -> None:
    replicate = upstreams[1]
    replicate.scenario = ReplicateScenario(wait_ticks=0)
    replicate.poll_errors = [ReplicateError(404, {"detail": "Not found.", "status": 404})]
    fails_without_retry(gateway, "rep", 502)
    assert len(replicate.creates) == 1
    assert wait_until(lambda: replicate.cancels == [replicate.last_create.id], timeout=5)


def test_throttled_creates_are_retried_and_the_prediction_runs_once(gateway: str, upstreams: Upstreams) -> None:
    replicate = upstreams[1]
    replicate.scenario = ReplicateScenario.instant(create_errors=[throttled(0), throttled(0)])
    assert generate(gateway, "rep").data
    assert len(replicate.rejected_creates) == 2 and len(replicate.creates) == 1


def test_create_answering_500_is_never_sent_again(gateway: str, upstreams: Upstreams) -> None:
    replicate = upstreams[1]
    replicate.scenario = ReplicateScenario(always_fail_create=server_error(500))
    fails_without_retry(gateway, "rep", 502)  # the prediction may exist: one create, whatever the SDK does
    assert len(replicate.rejected_creates) == 1


def test_fan_out_with_one_failed_prediction_makes_each_prediction_once(gateway: str, upstreams: Upstreams) -> None:
    replicate = upstreams[1]
    replicate.script.extend([ReplicateScenario.instant(), ReplicateScenario.instant(outcome="failed", error="oom"),
                             ReplicateScenario.instant()])
    fails_without_retry(gateway, "rep", 502, n=3)
    # The failure cancels the calls still in flight (a third create may not have left yet); none is repeated.
    assert 2 <= len(replicate.creates) <= 3
    assert [p.final_status for p in replicate.creates].count("failed") == 1


# ---- OpenAI-compatible upstream ------------------------------------------------------------------------


def test_openai_upstream_500_is_called_once(gateway: str, upstreams: Upstreams) -> None:
    oai = upstreams[2]
    oai.answer = lambda: JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
    fails_without_retry(gateway, "oai", 502)
    assert oai.calls == 1


def test_openai_upstream_503_may_be_retried(gateway: str, upstreams: Upstreams) -> None:
    oai = upstreams[2]
    answers = iter([JSONResponse({"error": {"message": "overloaded"}}, 503)])
    oai.answer = lambda: next(answers, JSONResponse({"data": [{"b64_json": ONE_PIXEL_PNG}]}))
    assert generate(gateway, "oai").data
    assert oai.calls == 2  # the upstream said it did not run it: the gateway retried once


ONE_PIXEL_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
