"""Replicate's protocol through respx: every path (sync, polling, cancel, Files API, downloads) and error class."""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from imagegate.core.errors import (
    ContentPolicyViolation,
    GatewayError,
    InsufficientCredit,
    InvalidRequest,
    PayloadTooLarge,
    ProviderNotConfigured,
    ProviderUnavailable,
    RateLimited,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamTimeout,
)
from imagegate.core.request import InputImage
from imagegate.providers.base import CallContext, ProviderImage, Route
from imagegate.providers.replicate import ReplicateProvider
from imagegate.providers.replicate.transport import cancel_after_header, is_replicate_url, prefer_wait_seconds
from imagegate.settings import ProvidersSettings, ReplicateSettings, Settings

API = "https://api.replicate.com/v1"
TOKEN = "r8_secret-token"
MODEL = "qwen/qwen-image-edit-2511"
CREATE = f"{API}/models/{MODEL}/predictions"
PAYLOAD = {"prompt": "make it blue", "image": ["https://example.com/a.png"], "output_format": "png"}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
ROUTE = Route("replicate", MODEL)


def settings(**replicate: Any) -> Settings:
    config = {"api_token": TOKEN, "poll_interval": 0.01, "poll_max_interval": 0.02, **replicate}
    return Settings(providers=ProvidersSettings(replicate=ReplicateSettings(**config)))


def prediction(
    status: str, output: Any = None, *, error: str | None = None, pid: str = "p1", **extra: Any
) -> dict[str, Any]:
    return {
        "id": pid,
        "model": MODEL,
        "version": "hidden",
        "input": extra.pop("input", PAYLOAD),
        "output": output,
        "error": error,
        "status": status,
        "data_removed": False,
        "created_at": "2026-01-01T00:00:00.000000Z",
        "urls": {
            "get": f"{API}/predictions/{pid}",
            "cancel": f"{API}/predictions/{pid}/cancel",
            "web": f"https://replicate.com/p/{pid}",
        },
        **extra,
    }


def ctx(seconds: float = 95.0) -> CallContext:
    return CallContext(request_id="req-1", deadline=time.monotonic() + seconds, operation="edit")


def problem(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers={"Content-Type": "application/problem+json", **(headers or {})})


@pytest.fixture
def provider(http: httpx.AsyncClient) -> ReplicateProvider:
    return ReplicateProvider(http, settings())


async def run_error(provider: ReplicateProvider, deadline: float = 95.0) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await provider.run(dict(PAYLOAD), ROUTE, ctx(deadline))
    return info.value


# ---- create ------------------------------------------------------------------------------------


async def test_create_request_is_exact(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    route = mock.post(CREATE).respond(
        201, json=prediction("succeeded", ["https://replicate.delivery/xezq/a/out-0.webp"])
    )
    result = await provider.run(dict(PAYLOAD), ROUTE, ctx(95.0))
    request = route.calls.last.request
    assert json.loads(request.content) == {"input": PAYLOAD}
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["prefer"] == "wait=60"
    assert request.headers["cancel-after"] == "95s"
    assert request.headers["content-type"] == "application/json"
    assert request.extensions["timeout"]["read"] == 65.0  # wait + a few seconds
    assert result.images == [
        ProviderImage(url="https://replicate.delivery/xezq/a/out-0.webp", content_type="image/webp")
    ]
    assert result.request_id == "p1"


async def test_wait_and_cancel_after_follow_the_deadline(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    route = mock.post(CREATE).respond(201, json=prediction("succeeded", ["https://replicate.delivery/a.png"]))
    await provider.run(dict(PAYLOAD), ROUTE, ctx(30.5))
    assert route.calls.last.request.headers["prefer"] == "wait=30"
    assert route.calls.last.request.headers["cancel-after"] == "31s"
    await provider.run(dict(PAYLOAD), ROUTE, ctx(2.0))
    assert route.calls.last.request.headers["prefer"] == "wait=1"
    assert route.calls.last.request.headers["cancel-after"] == "5s"  # Replicate's minimum


def test_header_helpers() -> None:
    assert prefer_wait_seconds(60, 300) == 60
    assert prefer_wait_seconds(10, 300) == 10
    assert prefer_wait_seconds(60, 0.2) == 1
    assert cancel_after_header(94.2) == "95s"
    assert cancel_after_header(1) == "5s"


async def test_configured_wait_seconds(http: httpx.AsyncClient, mock: respx.MockRouter) -> None:
    route = mock.post(CREATE).respond(201, json=prediction("succeeded", ["https://replicate.delivery/a.png"]))
    await ReplicateProvider(http, settings(wait_seconds=7)).run(dict(PAYLOAD), ROUTE, ctx())
    assert route.calls.last.request.headers["prefer"] == "wait=7"
    assert route.calls.last.request.extensions["timeout"]["read"] == 12.0


async def test_pinned_version_uses_predictions_endpoint(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    route = mock.post(f"{API}/predictions").respond(
        201, json=prediction("succeeded", ["https://replicate.delivery/a.png"])
    )
    await provider.run(dict(PAYLOAD), Route("replicate", "qwen/qwen-image:abc123"), ctx())
    assert json.loads(route.calls.last.request.content) == {"version": "abc123", "input": PAYLOAD}


# ---- outputs -----------------------------------------------------------------------------------


async def test_single_string_output_is_a_list_of_one(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).respond(201, json=prediction("succeeded", "https://replicate.delivery/x/out-0.jpg?sig=1"))
    result = await provider.run(dict(PAYLOAD), ROUTE, ctx())
    assert result.images == [
        ProviderImage(url="https://replicate.delivery/x/out-0.jpg?sig=1", content_type="image/jpeg")
    ]


async def test_data_uri_outputs_are_passed_on_undecoded(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    """Decoding is CPU work: it happens in the image pool at delivery, not on the event loop here."""
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    mock.post(CREATE).respond(201, json=prediction("succeeded", [uri, uri]))
    result = await provider.run(dict(PAYLOAD), ROUTE, ctx())
    assert result.images == [ProviderImage(url=uri, content_type="image/png")] * 2
    assert all(image.data is None and (image.url or "").startswith("data:") for image in result.images)
    assert await provider.fetch(result.images[0]) == PNG


async def test_malformed_data_uri_output_is_an_upstream_error(
    provider: ReplicateProvider, mock: respx.MockRouter
) -> None:
    mock.post(CREATE).respond(201, json=prediction("succeeded", ["data:image/png,notbase64"]))
    assert type(await run_error(provider)) is UpstreamError


async def test_url_without_evident_extension(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).respond(201, json=prediction("succeeded", ["https://replicate.delivery/x/out"]))
    result = await provider.run(dict(PAYLOAD), ROUTE, ctx())
    assert result.images == [ProviderImage(url="https://replicate.delivery/x/out", content_type=None)]


async def test_processing_with_output_counts_as_done(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).respond(201, json=prediction("processing", ["https://replicate.delivery/a.png"]))
    poll = mock.get(f"{API}/predictions/p1")
    result = await provider.run(dict(PAYLOAD), ROUTE, ctx())
    assert result.images[0].url == "https://replicate.delivery/a.png"
    assert poll.call_count == 0


async def test_processing_with_empty_output_keeps_polling(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).respond(201, json=prediction("processing", []))
    poll = mock.get(f"{API}/predictions/p1").mock(
        side_effect=[
            httpx.Response(200, json=prediction("processing", [])),
            httpx.Response(200, json=prediction("succeeded", ["https://replicate.delivery/a.png"])),
        ]
    )
    result = await provider.run(dict(PAYLOAD), ROUTE, ctx())
    assert poll.call_count == 2
    assert poll.calls.last.request.headers["authorization"] == f"Bearer {TOKEN}"
    assert result.images[0].url == "https://replicate.delivery/a.png"


async def test_polls_urls_get(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    def at_get_url(body: dict[str, Any]) -> dict[str, Any]:
        body["urls"]["get"] = "https://api.replicate.com/v1/predictions/p1?via=urls.get"
        return body

    mock.post(CREATE).respond(201, json=at_get_url(prediction("starting")))
    poll = mock.get("https://api.replicate.com/v1/predictions/p1", params={"via": "urls.get"}).mock(
        side_effect=[
            httpx.Response(200, json=at_get_url(prediction("starting"))),
            httpx.Response(200, json=at_get_url(prediction("processing"))),
            httpx.Response(200, json=at_get_url(prediction("succeeded", ["https://replicate.delivery/a.png"]))),
        ]
    )
    await provider.run(dict(PAYLOAD), ROUTE, ctx())
    assert poll.call_count == 3


async def test_poll_retries_transient_errors(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).respond(201, json=prediction("starting"))
    poll = mock.get(f"{API}/predictions/p1").mock(
        side_effect=[
            httpx.Response(503),
            httpx.ConnectError("reset"),
            httpx.Response(200, json=prediction("succeeded", ["https://replicate.delivery/a.png"])),
        ]
    )
    await provider.run(dict(PAYLOAD), ROUTE, ctx())
    assert poll.call_count == 3


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow")])
async def test_poll_connect_errors_do_not_create_again(
    provider: ReplicateProvider, mock: respx.MockRouter, exc: Exception
) -> None:
    """The service runs `run` again only for retryable errors: once the prediction exists, a lost
    poll must not be one, or a second (billed) prediction is created."""
    create = mock.post(CREATE).respond(201, json=prediction("starting"))
    poll = mock.get(f"{API}/predictions/p1").mock(side_effect=exc)
    cancel = mock.post(f"{API}/predictions/p1/cancel").respond(200, json=prediction("canceled"))
    for _ in range(3):  # the service's attempts (`_call_with_retries`)
        error = await run_error(provider)
        if not error.retryable:
            break
    assert type(error) is ProviderUnavailable and (error.retryable, error.fallback) == (False, True)
    assert create.call_count == 1
    assert poll.call_count == 5  # get_with_retry's attempts
    assert cancel.call_count == 1


@pytest.mark.parametrize("output", [[], None])
async def test_empty_output_is_all_filtered(provider: ReplicateProvider, mock: respx.MockRouter, output: Any) -> None:
    mock.post(CREATE).respond(201, json=prediction("succeeded", output))
    error = await run_error(provider)
    assert isinstance(error, ContentPolicyViolation)
    assert (error.status, error.code, error.fallback) == (400, "content_policy_violation", False)


async def test_empty_output_with_checker_off_is_an_upstream_error(
    provider: ReplicateProvider, mock: respx.MockRouter
) -> None:
    body = prediction("succeeded", [], input={**PAYLOAD, "disable_safety_checker": True})
    mock.post(CREATE).respond(201, json=body)
    error = await run_error(provider)
    assert type(error) is UpstreamError and error.status == 502


# ---- failed predictions ------------------------------------------------------------------------

SENSITIVE = "The input or output was flagged as sensitive. Please try again with different inputs. (E005) (uIJ6l3ruRD)"


@pytest.mark.parametrize(
    "message",
    [
        SENSITIVE,
        "All generated images contained NSFW content. Try running it again with a different prompt.",
        "NSFW content detected. Try running it again, or try a different prompt.",
        "Prediction failed: E005",
    ],
)
async def test_failed_content_policy(provider: ReplicateProvider, mock: respx.MockRouter, message: str) -> None:
    mock.post(CREATE).respond(201, json=prediction("failed", error=message))
    cancel = mock.post(f"{API}/predictions/p1/cancel")
    error = await run_error(provider)
    assert isinstance(error, ContentPolicyViolation)
    assert (error.status, error.code, error.retryable, error.fallback) == (
        400,
        "content_policy_violation",
        False,
        False,
    )
    assert cancel.call_count == 0  # terminal: nothing to cancel


@pytest.mark.parametrize("message", ["Unknown error (E1000)", "Timed out starting the prediction (E6716)"])
async def test_failed_infrastructure_is_never_created_again(
    provider: ReplicateProvider, mock: respx.MockRouter, message: str
) -> None:
    mock.post(CREATE).respond(201, json=prediction("starting"))
    mock.get(f"{API}/predictions/p1").respond(200, json=prediction("failed", error=message))
    error = await run_error(provider)
    assert type(error) is ProviderUnavailable
    # the prediction existed: no new one on this route (the service falls back only if the operator opts in)
    assert (error.status, error.retryable, error.fallback, error.accepted) == (503, False, True, True)


async def test_failed_model_error(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).respond(201, json=prediction("failed", error="CUDA out of memory (E1001)"))
    error = await run_error(provider)
    assert type(error) is UpstreamError
    assert (error.status, error.code, error.retryable, error.fallback) == (502, "upstream_error", False, True)
    assert "CUDA out of memory (E1001)" in error.message


@pytest.mark.parametrize("status", ["canceled", "aborted"])
async def test_canceled_or_aborted_is_a_timeout(
    provider: ReplicateProvider, mock: respx.MockRouter, status: str
) -> None:
    mock.post(CREATE).respond(201, json=prediction("starting"))
    mock.get(f"{API}/predictions/p1").respond(200, json=prediction(status))
    error = await run_error(provider)
    assert type(error) is UpstreamTimeout and error.status == 504 and status in error.message


# ---- HTTP errors -------------------------------------------------------------------------------


def invalid(field: str, description: str, kind: str = "enum") -> dict[str, Any]:
    return {
        "detail": f"- {field}: {description}\n",
        "status": 422,
        "title": "Input validation failed",
        "invalid_fields": [{"type": kind, "field": field, "description": description}],
    }


@pytest.mark.parametrize(
    ("field", "description", "kind", "param", "code"),
    [
        ("input.aspect_ratio", 'aspect_ratio must be one of the following: "1:1"', "enum", "size", "invalid_value"),
        ("input.image", "image is invalid", "format", "image", "invalid_value"),
        ("input.image.1", "Does not match format 'uri'", "format", "image", "invalid_value"),
        ("input.output_format", "output_format must be one of ...", "enum", "output_format", "invalid_value"),
        (
            "input.output_quality",
            "Must be less than or equal to 100",
            "number_lte",
            "output_compression",
            "invalid_value",
        ),
        ("input.guidance", "Must be less than or equal to 10", "number_lte", "cfg_scale", "invalid_value"),
        (
            "input.num_inference_steps",
            "Must be less than or equal to 4",
            "number_lte",
            "num_inference_steps",
            "invalid_value",
        ),
        ("input", "prompt is required", "required", "prompt", "missing_required_parameter"),
        (
            "input",
            "Additional property num_outputs is not allowed",
            "additional_property_not_allowed",
            "num_outputs",
            "invalid_value",
        ),
    ],
)
async def test_422_invalid_fields_name_the_openai_param(
    provider: ReplicateProvider, mock: respx.MockRouter, field: str, description: str, kind: str, param: str, code: str
) -> None:
    mock.post(CREATE).mock(return_value=problem(422, invalid(field, description, kind)))
    error = await run_error(provider)
    assert type(error) is InvalidRequest
    assert (error.status, error.param, error.code, error.fallback) == (400, param, code, False)
    assert description in error.message


async def test_422_not_about_input_is_an_upstream_error(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    body = {
        "title": "Invalid version or not permitted",
        "detail": "The specified version does not exist (or perhaps you don't have permission to use it?)",
        "status": 422,
    }
    mock.post(CREATE).mock(return_value=problem(422, body))
    error = await run_error(provider)
    assert type(error) is UpstreamError and error.fallback and "version does not exist" in error.message


async def test_402_insufficient_credit(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    body = {"title": "Insufficient credit", "detail": "You have insufficient credit to run this model.", "status": 402}
    route = mock.post(CREATE).mock(return_value=problem(402, body))
    error = await run_error(provider)
    assert type(error) is InsufficientCredit
    assert (error.status, error.code, error.retryable, error.fallback) == (402, "insufficient_credit", False, True)
    assert route.call_count == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failure_never_echoes_the_token(
    provider: ReplicateProvider, mock: respx.MockRouter, status: int
) -> None:
    body = {"title": "Unauthenticated", "detail": f"bad token {TOKEN}", "status": status}
    mock.post(CREATE).mock(return_value=problem(status, body))
    error = await run_error(provider)
    assert type(error) is UpstreamAuthFailed
    assert (error.status, error.code, error.retryable) == (502, "upstream_auth_failed", False)
    assert TOKEN not in error.message and "r8_" not in error.message


async def test_429_honours_retry_after_header(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    body = {"detail": "Request was throttled. Your rate limit resets in ~5s.", "status": 429, "retry_after": 5}
    mock.post(CREATE).mock(return_value=problem(429, body, {"Retry-After": "7"}))
    error = await run_error(provider)
    assert type(error) is RateLimited
    assert (error.status, error.retry_after, error.retryable, error.fallback) == (429, 7.0, True, True)


async def test_429_falls_back_to_body_retry_after(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    body = {"detail": "Request was throttled.", "status": 429, "retry_after": 5}
    mock.post(CREATE).mock(return_value=problem(429, body))
    error = await run_error(provider)
    assert type(error) is RateLimited and error.retry_after == 5.0


@pytest.mark.parametrize(("status", "kind"), [(500, UpstreamError), (502, UpstreamError), (504, UpstreamError)])
async def test_create_5xx_is_not_retryable_but_may_fall_back(
    provider: ReplicateProvider, mock: respx.MockRouter, status: int, kind: type[GatewayError]
) -> None:
    route = mock.post(CREATE).mock(return_value=problem(status, {"detail": "Internal server error"}))
    error = await run_error(provider)
    assert type(error) is kind
    assert (error.retryable, error.fallback, error.accepted) == (False, True, True)
    assert route.call_count == 1


async def test_create_503_is_a_refusal_safe_to_retry(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    route = mock.post(CREATE).mock(return_value=problem(503, {"detail": "Service Unavailable", "status": 503}))
    error = await run_error(provider)
    assert type(error) is ProviderUnavailable and error.status == 503
    assert (error.retryable, error.fallback, error.accepted) == (True, True, False)
    assert route.call_count == 1
    # a 503 that carries a prediction: it exists, never created again
    mock.post(CREATE).mock(return_value=problem(503, {"id": "p1", "status": "starting", "detail": "busy"}))
    error = await run_error(provider)
    assert (error.retryable, error.accepted) == (False, True)


async def test_create_400_and_404(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).mock(return_value=problem(400, {"detail": "Invalid JSON body", "status": 400}))
    error = await run_error(provider)
    assert type(error) is InvalidRequest and error.status == 400
    mock.post(CREATE).mock(return_value=problem(404, {"detail": "Not found.", "status": 404}))
    error = await run_error(provider)
    assert type(error) is UpstreamError and error.fallback and "404" in error.message


async def test_create_read_timeout_may_have_been_accepted(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).mock(side_effect=httpx.ReadTimeout("slow"))
    error = await run_error(provider)
    assert type(error) is UpstreamTimeout and (error.retryable, error.fallback) == (False, True)


async def test_create_connect_error_proves_nothing_was_created(
    provider: ReplicateProvider, mock: respx.MockRouter
) -> None:
    mock.post(CREATE).mock(side_effect=httpx.ConnectError("refused"))
    error = await run_error(provider)
    assert type(error) is ProviderUnavailable and (error.retryable, error.fallback) == (True, True)


async def test_non_prediction_body_is_an_upstream_error(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).respond(201, text="<html>")
    assert type(await run_error(provider)) is UpstreamError


async def test_poll_404_fails_and_cancels(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).respond(201, json=prediction("starting"))
    mock.get(f"{API}/predictions/p1").mock(return_value=problem(404, {"detail": "Not found.", "status": 404}))
    cancel = mock.post(f"{API}/predictions/p1/cancel").respond(200, json=prediction("canceled"))
    error = await run_error(provider)
    assert type(error) is UpstreamError and error.retryable is False
    assert cancel.call_count == 1


async def test_poll_429_after_retries_is_not_retryable(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).respond(201, json=prediction("starting"))
    poll = mock.get(f"{API}/predictions/p1").mock(
        return_value=problem(429, {"detail": "throttled"}, {"Retry-After": "0"})
    )
    mock.post(f"{API}/predictions/p1/cancel").respond(200, json=prediction("canceled"))
    error = await run_error(provider)
    assert type(error) is RateLimited and error.retryable is False  # the prediction exists: a new run bills twice
    assert poll.call_count == 5


# ---- cancellation ------------------------------------------------------------------------------


async def test_cancelled_while_polling_cancels_upstream(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).respond(201, json=prediction("starting"))
    poll = mock.get(f"{API}/predictions/p1").respond(200, json=prediction("processing"))
    cancel = mock.post(f"{API}/predictions/p1/cancel").respond(200, json=prediction("canceled"))
    task = asyncio.create_task(provider.run(dict(PAYLOAD), ROUTE, ctx()))
    while poll.call_count < 2:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancel.call_count == 1
    assert cancel.calls.last.request.headers["authorization"] == f"Bearer {TOKEN}"


async def test_cancelled_during_create_cancels_once_created(
    provider: ReplicateProvider, mock: respx.MockRouter
) -> None:
    started = asyncio.Event()

    async def slow_create(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.sleep(0.05)
        return httpx.Response(201, json=prediction("processing", []))

    mock.post(CREATE).mock(side_effect=slow_create)
    cancel = mock.post(f"{API}/predictions/p1/cancel").respond(200, json=prediction("canceled"))
    task = asyncio.create_task(provider.run(dict(PAYLOAD), ROUTE, ctx()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if cancel.call_count:
            break
        await asyncio.sleep(0.01)
    assert cancel.call_count == 1


async def test_deadline_while_polling_times_out_and_cancels(
    provider: ReplicateProvider, mock: respx.MockRouter
) -> None:
    mock.post(CREATE).respond(201, json=prediction("starting"))
    mock.get(f"{API}/predictions/p1").respond(200, json=prediction("processing"))
    cancel = mock.post(f"{API}/predictions/p1/cancel").respond(200, json=prediction("canceled"))
    error = await run_error(provider, deadline=0.05)
    assert type(error) is UpstreamTimeout
    assert cancel.call_count == 1


async def test_cancel_failure_is_swallowed(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    mock.post(CREATE).respond(201, json=prediction("starting"))
    mock.get(f"{API}/predictions/p1").respond(200, json=prediction("processing"))
    mock.post(f"{API}/predictions/p1/cancel").mock(side_effect=httpx.ConnectError("down"))
    assert type(await run_error(provider, deadline=0.05)) is UpstreamTimeout


# ---- inputs: data URIs and the Files API -------------------------------------------------------


def multipart_parts(request: httpx.Request) -> dict[str, tuple[str | None, str | None, bytes]]:
    """name -> (filename, content type, bytes) of a multipart/form-data request."""
    raw = b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + request.content
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    parts: dict[str, tuple[str | None, str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(name, str) and isinstance(payload, bytes)
        parts[name] = (part.get_filename(), part.get("content-type"), payload)
    return parts


async def test_small_input_is_a_data_uri(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    refs = await provider.prepare_images([InputImage(data=PNG, format="png")], ROUTE)
    assert refs == ["data:image/png;base64," + base64.b64encode(PNG).decode()]
    assert not mock.calls


async def test_large_input_goes_through_the_files_api(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    big = PNG + b"\x01" * 300_000
    upload = mock.post(f"{API}/files").respond(
        201, json={"id": "f1", "urls": {"get": f"{API}/files/f1"}, "content_type": "image/png", "size": len(big)}
    )
    url = "https://example.com/c.jpg"
    refs = await provider.prepare_images(
        [InputImage(data=big, format="png", filename="cat.png"), InputImage(url=url)], ROUTE
    )
    assert refs == [f"{API}/files/f1", url]
    request = upload.calls.last.request
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    parts = multipart_parts(request)
    assert parts["content"] == ("cat.png", "image/png", big)
    assert json.loads(parts["metadata"][2]) == {"uploaded_by": "imagegate"}


async def test_upload_errors(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    route = Route("replicate", MODEL, options={"inline_max_bytes": 4})
    images = [InputImage(data=PNG, format="png")]
    mock.post(f"{API}/files").mock(return_value=problem(500, {"detail": "Internal server error"}))
    with pytest.raises(ProviderUnavailable) as unavailable:
        await provider.prepare_images(images, route)
    assert unavailable.value.retryable  # no prediction exists yet: safe to try again
    mock.post(f"{API}/files").mock(return_value=problem(413, {"detail": "Files must be less than 100MB in size"}))
    with pytest.raises(PayloadTooLarge) as too_large:
        await provider.prepare_images(images, route)
    assert (too_large.value.status, too_large.value.param) == (413, "image")
    mock.post(f"{API}/files").respond(201, json={"id": "f1"})
    with pytest.raises(UpstreamError):
        await provider.prepare_images(images, route)


# ---- downloads: the token only goes to Replicate hosts ----------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://replicate.delivery/xezq/a/out-0.webp", True),
        ("https://pbxt.replicate.delivery/a/out-0.png", True),
        ("https://api.replicate.com/v1/files/f1/download", True),
        ("http://replicate.delivery/a.png", False),
        ("https://replicate.delivery.evil.com/a.png", False),
        ("https://evilreplicate.delivery/a.png", False),
        ("https://cdn.example.com/a.png", False),
        ("http://127.0.0.1:9000/v1/files/x", True),  # the configured base_url's origin
        ("http://127.0.0.1:9001/v1/files/x", False),
    ],
)
def test_is_replicate_url(url: str, expected: bool) -> None:
    assert is_replicate_url(url, "http://127.0.0.1:9000/v1") is expected


async def test_fetch_sends_token_only_to_replicate_hosts(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    delivery = mock.get("https://replicate.delivery/x/out-0.png").respond(200, content=PNG)
    other = mock.get("https://cdn.example.com/out.png").respond(200, content=PNG)
    assert await provider.fetch(ProviderImage(url="https://replicate.delivery/x/out-0.png")) == PNG
    assert await provider.fetch(ProviderImage(url="https://cdn.example.com/out.png")) == PNG
    assert delivery.calls.last.request.headers["authorization"] == f"Bearer {TOKEN}"
    assert "authorization" not in other.calls.last.request.headers


async def test_fetch_redirect_to_another_host_drops_the_token(
    provider: ReplicateProvider, mock: respx.MockRouter
) -> None:
    mock.get("https://replicate.delivery/x/out-0.png").respond(
        302, headers={"Location": "https://cdn.example.com/o.png"}
    )
    target = mock.get("https://cdn.example.com/o.png").respond(200, content=PNG)
    assert await provider.fetch(ProviderImage(url="https://replicate.delivery/x/out-0.png")) == PNG
    assert "authorization" not in target.calls.last.request.headers


async def test_fetch_bytes_in_hand_and_errors(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    assert await provider.fetch(ProviderImage(data=PNG)) == PNG
    mock.get("https://replicate.delivery/gone.png").respond(404, text="Not Found")
    with pytest.raises(UpstreamError):
        await provider.fetch(ProviderImage(url="https://replicate.delivery/gone.png"))


class Chunks(httpx.AsyncByteStream):
    def __init__(self, size: int, count: int) -> None:
        self.chunk, self.count, self.sent = b"\0" * size, count, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.sent += 1
            yield self.chunk


@pytest.mark.parametrize("declared", [True, False])
async def test_oversized_output_is_refused_while_streaming(
    http: httpx.AsyncClient, mock: respx.MockRouter, declared: bool
) -> None:
    body = Chunks(64 * 1024, 1024)  # 64 MiB
    headers = {"Content-Length": str(64 * 1024 * 1024)} if declared else {}
    big = "https://replicate.delivery/x/big.png"
    mock.get(big).mock(return_value=httpx.Response(200, headers=headers, stream=body))
    config = ProvidersSettings(replicate=ReplicateSettings(api_token=TOKEN))
    provider = ReplicateProvider(http, Settings(providers=config, fetch={"max_bytes": 2**20}))
    with pytest.raises(UpstreamError, match="larger than the limit"):
        await provider.fetch(ProviderImage(url=big))
    assert body.sent == (0 if declared else 17)


async def test_fetch_lost_connection_is_not_retryable(provider: ReplicateProvider, mock: respx.MockRouter) -> None:
    route = mock.get("https://replicate.delivery/x/out-0.png").mock(side_effect=httpx.ConnectError("reset"))
    with pytest.raises(ProviderUnavailable) as err:
        await provider.fetch(ProviderImage(url="https://replicate.delivery/x/out-0.png"))
    assert not err.value.retryable
    assert route.call_count == 5  # idempotent GET: retried in place


# ---- configuration -----------------------------------------------------------------------------


async def test_not_configured(http: httpx.AsyncClient, mock: respx.MockRouter) -> None:
    provider = ReplicateProvider(http, Settings(providers=ProvidersSettings(replicate=ReplicateSettings())))
    with pytest.raises(ProviderNotConfigured) as info:
        provider.check_configured()
    assert info.value.message == "provider replicate is not configured: set REPLICATE_API_TOKEN"
    assert info.value.status == 503
    with pytest.raises(ProviderNotConfigured):
        await provider.run(dict(PAYLOAD), ROUTE, ctx())
    assert not mock.calls
