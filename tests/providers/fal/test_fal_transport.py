"""fal's protocol, path by path, against respx: URLs, headers, bodies, retries and error classes."""

from __future__ import annotations

import asyncio
import gc
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
from imagegate.providers import common
from imagegate.providers.base import CallContext, ProviderImage, Route
from imagegate.providers.fal import FalProvider
from imagegate.providers.fal.errors import FalFailure, map_failure
from imagegate.providers.fal.transport import request_timeout_header
from imagegate.settings import FalSettings, ProvidersSettings, Settings

KEY = "sk-fal-secret"
MODEL = "fal-ai/qwen-image-edit-2511"
SUBMIT = f"https://queue.fal.run/{MODEL}"
# Deliberately not derivable from the model id: the adapter must use the URLs fal returns (on its host).
BASE = "https://queue.fal.run/fal-ai/another-app/requests/rid-1"
STATUS, RESULT, CANCEL = f"{BASE}/status?x=1", BASE, f"{BASE}/cancel"
HANDLE = {"status": "IN_QUEUE", "request_id": "rid-1", "status_url": STATUS, "response_url": RESULT,
          "cancel_url": CANCEL, "queue_position": 0}
OUTPUT = {
    "images": [{"url": "https://v3.fal.media/files/out.png", "width": 64, "height": 48, "content_type": "image/png"}],
    "seed": 9,
    "has_nsfw_concepts": [False],
}
PAYLOAD = {"prompt": "p", "image_urls": ["https://example.com/in.png"], "num_images": 1}


def settings(**fal: Any) -> Settings:
    # Polling unless a test asks for the status stream (its own section below).
    values: dict[str, Any] = {"key": KEY, "poll_interval": 0.01, "poll_max_interval": 0.02, "status_stream": False,
                              **fal}
    return Settings(providers=ProvidersSettings(fal=FalSettings(**values)))


def ctx(seconds: float = 10.0) -> CallContext:
    return CallContext(request_id="gw-1", deadline=time.monotonic() + seconds, operation="edit")


def route(**options: Any) -> Route:
    return Route(provider="fal", model=MODEL, options=options)


def status(name: str, **extra: Any) -> httpx.Response:
    return httpx.Response(200 if name == "COMPLETED" else 202, json={**HANDLE, "status": name, **extra})


def fal_error(code: int, body: Any, request_id: str | None = "rid-1", **headers: str) -> httpx.Response:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    if request_id:
        hdrs["x-fal-request-id"] = request_id
    if isinstance(body, str):
        return httpx.Response(code, text=body, headers=hdrs)
    return httpx.Response(code, json=body, headers=hdrs)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """get_with_retry's backoff, made instant (retry counts stay the same)."""
    monkeypatch.setattr(common, "backoff_delay", lambda *a, **k: 0.0)


def queue(mock: respx.MockRouter, *statuses: httpx.Response, result: httpx.Response | None = None) -> None:
    mock.post(SUBMIT).respond(200, json=HANDLE, headers={"x-fal-request-id": "rid-1"})
    mock.get(STATUS).mock(side_effect=list(statuses) or [status("COMPLETED")])
    done = httpx.Response(200, json=OUTPUT, headers={"x-fal-request-id": "rid-1"})
    mock.get(RESULT).mock(return_value=result or done)
    mock.put(CANCEL).respond(202, json={"status": "CANCELLATION_REQUESTED"})


# ---- queue ----------------------------------------------------------------------------------------


async def test_queue_flow_uses_the_returned_urls(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    queue(mock, status("IN_QUEUE"), status("IN_PROGRESS"), status("COMPLETED", metrics={"inference_time": 1}))
    result = await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx(30))

    assert result.images == [
        ProviderImage(url="https://v3.fal.media/files/out.png", content_type="image/png", width=64, height=48)
    ]
    assert (result.seed, result.request_id) == (9, "rid-1")
    submit = mock.routes[0].calls.last.request
    assert json.loads(submit.content) == PAYLOAD
    assert submit.headers["authorization"] == f"Key {KEY}"
    assert submit.headers["content-type"] == "application/json"
    assert 28 < float(submit.headers["x-fal-request-timeout"]) <= 30
    assert [str(c.request.url) for c in mock.calls] == [SUBMIT, STATUS, STATUS, STATUS, RESULT]
    assert all(c.request.headers["authorization"] == f"Key {KEY}" for c in mock.calls)


async def test_key_id_and_secret(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    queue(mock)
    config = settings(key=None, key_id="id", key_secret="sec")
    await FalProvider(http, config).run(dict(PAYLOAD), route(), ctx())
    assert mock.calls[0].request.headers["authorization"] == "Key id:sec"


def test_not_configured() -> None:
    provider = FalProvider(httpx.AsyncClient(), settings(key=None, key_id="only-id"))
    with pytest.raises(ProviderNotConfigured) as err:
        provider.check_configured()
    assert err.value.message == "provider fal is not configured: set FAL_KEY (or FAL_KEY_ID and FAL_KEY_SECRET)"
    assert err.value.status == 503 and not err.value.retryable


async def test_status_poll_retries_transient_errors(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    queue(mock, fal_error(503, "<html>nginx</html>", None), status("IN_PROGRESS"), status("COMPLETED"))
    result = await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    assert result.request_id == "rid-1"
    assert mock.routes[1].call_count == 3


async def test_status_that_keeps_failing_cancels_and_is_not_retryable(
    mock: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    queue(mock, *[fal_error(500, {"detail": "boom"})] * 5)
    with pytest.raises(UpstreamError) as err:
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    assert not err.value.retryable and err.value.fallback
    assert mock.routes[1].call_count == 5  # get_with_retry's attempts
    assert mock.routes[3].call_count == 1  # cancel_url


async def test_result_202_is_fetched_again(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    queue(mock)
    mock.get(RESULT).mock(side_effect=[status("IN_PROGRESS"), httpx.Response(200, json=OUTPUT)])
    result = await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    assert result.request_id == "rid-1" and len(result.images) == 1


async def test_cancelling_the_run_cancels_the_job(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    mock.post(SUBMIT).respond(200, json=HANDLE)
    polled = asyncio.Event()

    def in_progress(request: httpx.Request) -> httpx.Response:
        polled.set()
        return status("IN_PROGRESS")

    mock.get(STATUS).mock(side_effect=in_progress)
    cancel = mock.put(CANCEL).respond(202, json={"status": "CANCELLATION_REQUESTED"})
    task = asyncio.create_task(FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx()))
    await asyncio.wait_for(polled.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancel.call_count == 1
    assert cancel.calls.last.request.method == "PUT"
    assert cancel.calls.last.request.headers["authorization"] == f"Key {KEY}"


async def test_cancelled_while_submitting_still_cancels_the_accepted_job(
    mock: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    on_the_wire = asyncio.Event()
    answer = asyncio.Event()

    async def slow_submit(request: httpx.Request) -> httpx.Response:
        on_the_wire.set()
        await answer.wait()  # fal accepts the job only after the client stopped waiting
        return httpx.Response(200, json=HANDLE)

    mock.post(SUBMIT).mock(side_effect=slow_submit)
    cancel = mock.put(CANCEL).respond(202, json={"status": "CANCELLATION_REQUESTED"})
    task = asyncio.create_task(FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx()))
    await asyncio.wait_for(on_the_wire.wait(), 2)
    task.cancel()
    await asyncio.sleep(0.01)
    answer.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancel.call_count == 1


def _raised_by_us(context: dict[str, Any]) -> bool:
    """An unretrieved error of a future, or of a task running code of imagegate (not another
    library's task that a collected object of an earlier test scheduled on this loop)."""
    future = context.get("future")
    code = getattr(future.get_coro(), "cr_code", None) if isinstance(future, asyncio.Task) else None
    return code is None or "imagegate" in code.co_filename or "tests" in code.co_filename


@pytest.mark.parametrize("cancelled", [False, True])
async def test_a_failed_submit_leaves_no_job_and_no_unretrieved_error(
    mock: respx.MockRouter, http: httpx.AsyncClient, cancelled: bool
) -> None:
    """The submit runs in a task of its own (the caller's cancellation must not abort it): when it
    fails, the caller gets its error, or (cancelled meanwhile) nothing is cancelled, and no task or
    future is left holding an error nobody read."""
    on_the_wire = asyncio.Event()
    answer = asyncio.Event()

    async def failing_submit(request: httpx.Request) -> httpx.Response:
        on_the_wire.set()
        await answer.wait()
        return fal_error(500, {"detail": "boom"})

    mock.post(SUBMIT).mock(side_effect=failing_submit)
    cancel = mock.put(CANCEL).respond(202, json={"status": "CANCELLATION_REQUESTED"})
    unhandled: list[dict[str, Any]] = []
    # Earlier tests' garbage is not this test's: an SDK client collected now schedules its `aclose()`
    # on this loop (openai's client wrapper does in `__del__`), which may fail; let that happen first.
    gc.collect()
    await asyncio.sleep(0.01)
    gc.collect()
    asyncio.get_running_loop().set_exception_handler(lambda _, context: unhandled.append(context))
    task = asyncio.create_task(FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx()))
    await asyncio.wait_for(on_the_wire.wait(), 2)
    if cancelled:
        task.cancel()
        await asyncio.sleep(0.01)
    answer.set()
    with pytest.raises(asyncio.CancelledError if cancelled else UpstreamError):
        await task
    await asyncio.sleep(0.01)
    del task
    gc.collect()
    await asyncio.sleep(0)
    assert cancel.call_count == 0
    assert [context for context in unhandled if _raised_by_us(context)] == []


async def test_deadline_cancels_the_job(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    queue(mock)
    mock.get(STATUS).mock(return_value=status("IN_QUEUE"))
    with pytest.raises(UpstreamTimeout) as err:
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx(0.2))
    assert err.value.status == 504 and not err.value.retryable
    assert "x-fal-request-timeout" not in mock.routes[0].calls.last.request.headers  # <= 1 s left
    assert mock.routes[3].call_count == 1


async def test_cancel_errors_are_swallowed(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    queue(mock)
    mock.get(STATUS).mock(return_value=status("IN_QUEUE"))
    mock.put(CANCEL).mock(side_effect=httpx.ConnectError("down"))
    with pytest.raises(UpstreamTimeout):
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx(0.1))


async def test_submit_without_urls_is_an_upstream_error(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    mock.post(SUBMIT).respond(200, json={"request_id": "rid-1"})
    with pytest.raises(UpstreamError, match="status_url"):
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())


# ---- SSE status stream -----------------------------------------------------------------------------


def sse(*events: dict[str, Any]) -> httpx.Response:
    text = ": keepalive\n\n" + "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


STREAM = f"{BASE}/status/stream?x=1"


async def test_status_stream(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    """The status is asked once as soon as the submit is answered; a job still running is then
    followed on the stream, not polled."""
    queue(mock, status("IN_QUEUE"))
    stream = mock.get(STREAM).mock(return_value=sse({"status": "IN_QUEUE"}, {**HANDLE, "status": "COMPLETED"}))
    result = await FalProvider(http, settings(status_stream=True)).run(dict(PAYLOAD), route(), ctx())
    assert result.request_id == "rid-1"
    assert stream.call_count == 1 and stream.calls.last.request.headers["accept"] == "text/event-stream"
    assert mock.routes[1].call_count == 1  # the first look only, then no polling


async def test_a_job_done_at_the_first_look_opens_no_stream(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    """A quick job costs three plain requests (submit, status, result) with the stream enabled."""
    queue(mock, status("COMPLETED"))
    stream = mock.get(STREAM).mock(return_value=sse({**HANDLE, "status": "COMPLETED"}))
    result = await FalProvider(http, settings(status_stream=True)).run(dict(PAYLOAD), route(), ctx())
    assert result.images and not stream.called
    assert [mock.routes[i].call_count for i in range(3)] == [1, 1, 1]


@pytest.mark.parametrize(
    "broken",
    [sse({"status": "IN_PROGRESS"}), httpx.Response(500), httpx.ReadTimeout("slow")],
    ids=["ends-early", "http-500", "read-timeout"],
)
async def test_broken_stream_falls_back_to_polling(
    mock: respx.MockRouter, http: httpx.AsyncClient, broken: Any
) -> None:
    queue(mock, status("IN_QUEUE"), status("IN_PROGRESS"), status("COMPLETED"))
    if isinstance(broken, Exception):
        mock.get(STREAM).mock(side_effect=broken)
    else:
        mock.get(STREAM).mock(return_value=broken)
    result = await FalProvider(http, settings(status_stream=True)).run(dict(PAYLOAD), route(), ctx())
    assert result.images and mock.routes[1].call_count == 3  # the first look, then polling
    assert mock.routes[0].call_count == 1


@pytest.mark.parametrize(
    "unsupported",
    [
        httpx.Response(404, json={"detail": "Not Found"}),
        httpx.Response(405, json={"detail": "Method Not Allowed"}),
        httpx.Response(501, text="not implemented"),
        httpx.Response(200, json={**HANDLE, "status": "IN_PROGRESS"}),  # a status answer, not a stream
    ],
    ids=["404", "405", "501", "not-sse"],
)
async def test_stream_not_served_polls_and_is_not_asked_again(
    mock: respx.MockRouter, http: httpx.AsyncClient, unsupported: httpx.Response
) -> None:
    """A fal that does not serve the stream: the job polls (submitted once), and so does every later
    job of the process without asking for the stream first."""
    queue(mock, status("IN_QUEUE"), status("IN_PROGRESS"), status("COMPLETED"), status("COMPLETED"))
    stream = mock.get(STREAM).mock(return_value=unsupported)
    provider = FalProvider(http, settings(status_stream=True))
    first = await provider.run(dict(PAYLOAD), route(), ctx())
    second = await provider.run(dict(PAYLOAD), route(), ctx())
    assert first.images and second.images
    assert stream.call_count == 1  # learnt once per process
    assert mock.routes[0].call_count == 2  # one submit per job: never paid twice
    assert mock.routes[1].call_count == 4  # job 1: the first look, then polled twice; job 2 once
    assert not mock.routes[3].called  # nothing cancelled


async def test_broken_stream_is_tried_again_by_the_next_job(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    queue(mock, status("IN_QUEUE"), status("COMPLETED"), status("IN_QUEUE"))
    stream = mock.get(STREAM).mock(
        side_effect=[httpx.ReadError("reset"), sse({**HANDLE, "status": "COMPLETED"})]
    )
    provider = FalProvider(http, settings(status_stream=True))
    await provider.run(dict(PAYLOAD), route(), ctx())
    await provider.run(dict(PAYLOAD), route(), ctx())
    assert stream.call_count == 2 and mock.routes[1].call_count == 3 and mock.routes[0].call_count == 2


async def test_streams_beyond_the_cap_poll(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    """`status_stream_max` streams at once; a job beyond that polls (the pool stays free for others)."""
    opened = asyncio.Event()
    release = asyncio.Event()

    async def slow_stream(request: httpx.Request) -> httpx.Response:
        opened.set()
        await release.wait()
        return sse({**HANDLE, "status": "COMPLETED"})

    queue(mock, status("IN_QUEUE"), status("IN_QUEUE"), status("COMPLETED"))
    stream = mock.get(STREAM).mock(side_effect=slow_stream)
    provider = FalProvider(http, settings(status_stream=True, status_stream_max=1))
    streaming = asyncio.ensure_future(provider.run(dict(PAYLOAD), route(), ctx()))
    await opened.wait()
    polled = await provider.run(dict(PAYLOAD), route(), ctx())  # finishes while the first streams
    release.set()
    assert polled.images and (await streaming).images
    assert stream.call_count == 1 and mock.routes[1].call_count == 3  # two first looks, one poll
    assert provider.transport.stream.open == 0


# ---- sync run, sync_mode ---------------------------------------------------------------------------


async def test_sync_run_per_route(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    run = mock.post(f"https://fal.run/{MODEL}").respond(200, json=OUTPUT, headers={"x-fal-request-id": "sync-1"})
    result = await FalProvider(http, settings()).run(dict(PAYLOAD), route(mode="sync"), ctx(20))
    assert result.request_id == "sync-1" and result.seed == 9
    request = run.calls.last.request
    assert json.loads(request.content) == PAYLOAD and request.headers["authorization"] == f"Key {KEY}"
    assert float(request.headers["x-fal-request-timeout"]) > 18
    assert len(mock.calls) == 1


async def test_sync_mode_asks_for_data_uris(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    out = {"images": [{"url": "data:image/png;base64,iVBORw==", "content_type": "image/png"}], "seed": 1}
    queue(mock, result=httpx.Response(200, json=out))
    result = await FalProvider(http, settings(sync_mode_b64=True)).run(dict(PAYLOAD), route(), ctx())
    assert json.loads(mock.calls[0].request.content) == {**PAYLOAD, "sync_mode": True}
    # kept as a data URL: core.emulate decodes it in the image pool, not on the event loop
    assert result.images == [ProviderImage(url="data:image/png;base64,iVBORw==", content_type="image/png")]
    queue(mock, result=httpx.Response(200, json=out))
    await FalProvider(http, settings()).run(dict(PAYLOAD), route(sync_mode=True), ctx())
    assert json.loads(mock.routes[0].calls.last.request.content)["sync_mode"] is True


# ---- errors ---------------------------------------------------------------------------------------


def validation(field: str, msg: str = "bad value", type_: str = "value_error") -> dict[str, Any]:
    return {"detail": [{"loc": ["body", field, 0], "msg": msg, "type": type_}]}


@pytest.mark.parametrize(
    ("field", "param"),
    [("image_urls", "image"), ("image_url", "image"), ("num_images", "n"), ("image_size", "size"),
     ("guidance_scale", "cfg_scale"), ("prompt", "prompt"), ("acceleration", "acceleration")],
)
async def test_validation_error_after_completed(
    mock: respx.MockRouter, http: httpx.AsyncClient, field: str, param: str
) -> None:
    queue(mock, result=fal_error(422, validation(field, "Input should be valid")))
    with pytest.raises(InvalidRequest) as err:
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    assert type(err.value) is InvalidRequest
    assert (err.value.status, err.value.param, err.value.message) == (400, param, "Input should be valid")
    assert not err.value.retryable and not err.value.fallback
    assert mock.routes[3].call_count == 0  # the job was already terminal: nothing to cancel


async def test_content_policy_violation(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    body = validation("prompt", "flagged by a content checker", "content_policy_violation")
    queue(mock, result=fal_error(422, body))
    with pytest.raises(ContentPolicyViolation) as err:
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    assert (err.value.status, err.value.code, err.value.param) == (400, "content_policy_violation", "prompt")


async def test_completed_with_runner_error_is_accepted(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    done = status("COMPLETED", error="Runner disconnected", error_type="runner_disconnected")
    queue(mock, done, result=fal_error(503, {"detail": "Runner disconnected"}))
    with pytest.raises(ProviderUnavailable) as err:
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    # fal took the job: never submitted again (fallback only if the operator opts in, decided by the service)
    assert err.value.accepted and not err.value.retryable and err.value.fallback and err.value.status == 503
    assert "runner_disconnected" in err.value.message
    assert mock.routes[2].call_count == 1  # the failed result is not re-fetched


async def test_completed_with_error_but_empty_result(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    done = status("COMPLETED", error="Runner disconnected", error_type="runner_disconnected")
    queue(mock, done, result=httpx.Response(200, json={"images": []}))
    with pytest.raises(ProviderUnavailable) as err:
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    assert err.value.accepted and not err.value.retryable


async def test_empty_images_flagged_is_content_policy(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    queue(mock, result=httpx.Response(200, json={"images": [], "has_nsfw_concepts": [True]}))
    with pytest.raises(ContentPolicyViolation):
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    queue(mock, result=httpx.Response(200, json={"images": []}))
    with pytest.raises(UpstreamError):
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())


@pytest.mark.parametrize("code", [401, 403])
async def test_auth_failure_never_echoes_the_key(mock: respx.MockRouter, http: httpx.AsyncClient, code: int) -> None:
    mock.post(SUBMIT).mock(return_value=fal_error(code, {"detail": f"Invalid key {KEY}"}, None))
    with pytest.raises(UpstreamAuthFailed) as err:
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    assert (err.value.status, err.value.message, err.value.code) == (502, "upstream authentication failed",
                                                                    "upstream_auth_failed")
    assert KEY not in repr(err.value) and not err.value.retryable


async def test_rate_limited_on_submit(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    submit = mock.post(SUBMIT).mock(return_value=fal_error(429, {"detail": "Too many"}, None, Retry_After="7"))
    with pytest.raises(RateLimited) as err:
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    assert (err.value.status, err.value.retry_after, err.value.retryable) == (429, 7.0, True)
    assert submit.call_count == 1  # retrying is the service's job


async def test_user_request_timeout_is_not_retried(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    body = {"detail": "Request timed out", "error_type": "request_timeout"}
    mock.post(SUBMIT).mock(return_value=fal_error(504, body, X_Fal_Request_Timeout_Type="user"))
    with pytest.raises(UpstreamTimeout) as err:
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    assert (err.value.status, err.value.retryable, err.value.fallback) == (504, False, True)


async def test_unknown_app(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    mock.post(SUBMIT).mock(return_value=fal_error(404, {"detail": "Application not found"}))
    with pytest.raises(UpstreamError) as err:
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    assert type(err.value) is UpstreamError and MODEL in err.value.message and not err.value.retryable


@pytest.mark.parametrize(
    ("exc", "cls", "retryable"),
    [(httpx.ConnectError("refused"), ProviderUnavailable, True),
     (httpx.ConnectTimeout("slow"), ProviderUnavailable, True),
     (httpx.ReadTimeout("slow"), UpstreamTimeout, False),
     (httpx.RemoteProtocolError("eof"), ProviderUnavailable, False)],
)
async def test_submit_connection_errors(
    mock: respx.MockRouter, http: httpx.AsyncClient, exc: Exception, cls: type[GatewayError], retryable: bool
) -> None:
    mock.post(SUBMIT).mock(side_effect=exc)
    with pytest.raises(cls) as err:
        await FalProvider(http, settings()).run(dict(PAYLOAD), route(), ctx())
    assert err.value.retryable is retryable and err.value.fallback


@pytest.mark.parametrize(
    ("response", "retryable"),
    [(fal_error(503, "<html><title>503 Service Unavailable</title>nginx</html>", None), True),
     (fal_error(503, {"detail": "x", "error_type": "runner_scheduling_failure"}), True),
     (fal_error(503, {"detail": "overloaded"}), False),
     (fal_error(502, {"detail": "x"}, X_Fal_Retryable="true"), False),  # fal's servers answered: it may have run
     (fal_error(503, {"detail": "x", "error_type": "runner_disconnected"}, X_Fal_Retryable="false"), False)],
    ids=["ingress", "runner", "fal-answered", "fal-says-retryable", "fal-says-not"],
)
async def test_sync_run_unavailable(
    mock: respx.MockRouter, http: httpx.AsyncClient, response: httpx.Response, retryable: bool
) -> None:
    mock.post(f"https://fal.run/{MODEL}").mock(return_value=response)
    with pytest.raises(ProviderUnavailable) as err:
        await FalProvider(http, settings(mode="sync")).run(dict(PAYLOAD), route(), ctx())
    assert err.value.retryable is retryable and err.value.fallback and err.value.status == 503


def failure(code: int, body: Any = None, request_id: str | None = "r", **headers: str) -> FalFailure:
    return FalFailure.from_response(fal_error(code, body if body is not None else {"detail": "x"}, request_id,
                                              **headers))


@pytest.mark.parametrize(
    ("fail", "stage", "cls", "status", "retryable"),
    [
        (failure(503), "submit", ProviderUnavailable, 503, False),  # fal answered: it may have queued it
        (failure(503, "<html>nginx</html>", request_id=None), "submit", ProviderUnavailable, 503, True),  # ingress
        (failure(429), "submit", RateLimited, 429, True),
        (failure(503, request_id=None), "status", ProviderUnavailable, 503, False),  # job accepted
        (failure(500, {"detail": "crash"}), "result", UpstreamError, 502, False),
        (failure(500, {"detail": "crash", "error_type": "runner_server_error"}), "result", ProviderUnavailable,
         503, False),  # the job was accepted: never submitted again
        (failure(429, request_id=None), "status", RateLimited, 429, False),
        (failure(429), "upload", RateLimited, 429, True),
        (failure(402), "submit", InsufficientCredit, 402, False),
        (failure(403, {"detail": "User is locked. Reason: Exhausted balance."}), "submit", InsufficientCredit,
         402, False),
        (failure(413), "submit", PayloadTooLarge, 413, False),
        (failure(499, {"detail": "x", "error_type": "client_cancelled"}), "result", UpstreamError, 502, False),
        (failure(400, {"detail": "Invalid image size"}), "run", InvalidRequest, 400, False),
        (failure(422, {"detail": [{"loc": [], "msg": "too big", "type": "image_too_large"}]}), "result",
         InvalidRequest, 400, False),
        (failure(403), "upload_put", ProviderUnavailable, 503, True),  # presigned storage URL, not fal auth
    ],
)
def test_failure_table(
    fail: FalFailure, stage: Any, cls: type[GatewayError], status: int, retryable: bool
) -> None:
    err = map_failure(fail, stage=stage, model=MODEL)
    assert type(err) is cls and err.status == status and err.retryable is retryable


def test_image_error_types_name_the_image() -> None:
    fail = failure(422, {"detail": [{"loc": [], "msg": "too big", "type": "image_too_large"}]})
    assert map_failure(fail, stage="result", model=MODEL).param == "image"


def test_request_timeout_header() -> None:
    assert request_timeout_header(30.06) == "30.0"
    assert request_timeout_header(1.15) == "1.1"
    assert request_timeout_header(1.05) is None
    assert request_timeout_header(0.5) is None


# ---- inputs: data URI vs upload -------------------------------------------------------------------

INITIATE = "https://rest.fal.ai/storage/upload/initiate"


def png(size: int) -> InputImage:
    return InputImage(data=b"\x89PNG" + b"\0" * (size - 4), format="png", width=1, height=1)


async def test_small_images_are_data_uris_urls_pass_through(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    small = png(10)
    refs = await FalProvider(http, settings()).prepare_images(
        [small, InputImage(url="https://example.com/a.png")], route()
    )
    assert refs == [small.data_uri(), "https://example.com/a.png"]
    assert not mock.calls


async def test_large_images_are_uploaded_concurrently(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    in_flight = peak = 0

    async def initiate(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        name = json.loads(request.content)["file_name"]
        return httpx.Response(200, json={"upload_url": f"https://up.example/{name}",
                                         "file_url": f"https://v3.fal.media/files/{name}"})

    mock.post(INITIATE).mock(side_effect=initiate)
    put = mock.put(url__startswith="https://up.example/").respond(200)
    images = [png(2000), png(10), png(3000)]
    refs = await FalProvider(http, settings(inline_max_bytes=1000)).prepare_images(images, route())

    assert refs == ["https://v3.fal.media/files/input-0.png", images[1].data_uri(),
                    "https://v3.fal.media/files/input-2.png"]
    assert peak == 2
    first = mock.routes[0].calls[0].request
    assert first.url.params["storage_type"] == "fal-cdn-v3"
    assert first.headers["authorization"] == f"Key {KEY}"
    assert json.loads(first.content) == {"content_type": "image/png", "file_name": "input-0.png"}
    bodies = {str(c.request.url): c.request for c in put.calls}
    assert bodies["https://up.example/input-0.png"].content == images[0].data
    assert bodies["https://up.example/input-2.png"].headers["content-type"] == "image/png"
    assert all("authorization" not in c.request.headers for c in put.calls)


async def test_route_option_overrides_inline_limit_and_dry_run_does_not_upload(
    mock: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    refs = await FalProvider(http, settings()).prepare_images([png(1234)], route(inline_max_bytes=1000),
                                                             dry_run=True)
    assert refs == ["<upload: image/png, 1234 bytes>"]
    assert not mock.calls


async def test_upload_errors(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    mock.post(INITIATE).mock(return_value=fal_error(401, {"detail": "no"}, None))
    with pytest.raises(UpstreamAuthFailed):
        await FalProvider(http, settings(inline_max_bytes=0)).prepare_images([png(10)], route())
    mock.post(INITIATE).respond(200, json={"upload_url": "https://up.example/x", "file_url": "https://f/x"})
    mock.put("https://up.example/x").respond(403, text="<Error>SignatureDoesNotMatch</Error>")
    with pytest.raises(ProviderUnavailable) as err:
        await FalProvider(http, settings(inline_max_bytes=0)).prepare_images([png(10)], route())
    assert err.value.retryable


# ---- no second submit once fal has accepted the job ------------------------------------------------


async def run_like_the_service(provider: FalProvider, rt: Route, attempts: int = 3) -> Any:
    """The service's retry policy (`_call_with_retries`): `run` again while the error is retryable."""
    for attempt in range(1, attempts + 1):
        try:
            return await provider.run(dict(PAYLOAD), rt, ctx())
        except GatewayError as exc:
            if not exc.retryable or attempt == attempts:
                raise
    raise AssertionError("unreachable")


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow")])
async def test_status_connect_errors_after_submit_do_not_resubmit(
    mock: respx.MockRouter, http: httpx.AsyncClient, exc: Exception
) -> None:
    submit = mock.post(SUBMIT).respond(200, json=HANDLE, headers={"x-fal-request-id": "rid-1"})
    polls = mock.get(STATUS).mock(side_effect=exc)
    cancel = mock.put(CANCEL).respond(202, json={"status": "CANCELLATION_REQUESTED"})
    with pytest.raises(ProviderUnavailable) as err:
        await run_like_the_service(FalProvider(http, settings()), route())
    assert not err.value.retryable and err.value.fallback  # the job exists: another route, never a resubmit
    assert submit.call_count == 1
    assert polls.call_count == 5  # get_with_retry's attempts
    assert cancel.call_count == 1


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow")])
async def test_result_connect_errors_after_completed_do_not_resubmit(
    mock: respx.MockRouter, http: httpx.AsyncClient, exc: Exception
) -> None:
    submit = mock.post(SUBMIT).respond(200, json=HANDLE, headers={"x-fal-request-id": "rid-1"})
    mock.get(STATUS).mock(return_value=status("COMPLETED"))
    result = mock.get(RESULT).mock(side_effect=exc)
    with pytest.raises(ProviderUnavailable) as err:
        await run_like_the_service(FalProvider(http, settings()), route())
    assert not err.value.retryable and err.value.fallback
    assert submit.call_count == 1
    assert result.call_count == 6  # one plain GET, then get_with_retry's attempts


@pytest.mark.parametrize(
    ("response", "retryable", "submits"),
    [(fal_error(503, {"detail": "overloaded"}), False, 1),
     (fal_error(500, {"detail": "boom"}), False, 1),
     (fal_error(502, {"detail": "x", "error_type": "runner_incomplete_response"}), False, 1),
     (fal_error(504, {"detail": "x"}), False, 1),
     (fal_error(503, "<html><title>503 Service Temporarily Unavailable</title>nginx</html>", None), True, 3),
     (fal_error(502, "<html>nginx</html>", None), True, 3),
     (fal_error(504, "<html>nginx</html>", None), True, 3),
     (fal_error(429, {"detail": "slow down"}), True, 3)],
    ids=["503-fal", "500-fal", "502-fal-runner", "504-fal", "503-ingress", "502-ingress", "504-ingress", "429"],
)
async def test_submit_is_resent_only_when_fal_did_not_take_it(
    mock: respx.MockRouter, http: httpx.AsyncClient, response: httpx.Response, retryable: bool, submits: int
) -> None:
    submit = mock.post(SUBMIT).mock(return_value=response)
    with pytest.raises(GatewayError) as err:
        await run_like_the_service(FalProvider(http, settings()), route())
    assert err.value.retryable is retryable and err.value.fallback
    assert submit.call_count == submits


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow")])
def test_transport_errors_of_accepted_jobs_are_never_retryable(exc: httpx.HTTPError) -> None:
    accepted = common.transport_error("fal", exc, accepted=True)
    assert not accepted.retryable and accepted.fallback
    assert common.transport_error("fal", exc, accepted=False).retryable


# ---- outputs: the base Provider.fetch -----------------------------------------------------------------

OUT = "https://v3.fal.media/files/out.png"


class Chunks(httpx.AsyncByteStream):
    def __init__(self, size: int, count: int) -> None:
        self.chunk, self.count, self.sent = b"\0" * size, count, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.sent += 1
            yield self.chunk


def capped(max_bytes: int) -> Settings:
    return Settings(providers=ProvidersSettings(fal=FalSettings(key=KEY)), fetch={"max_bytes": max_bytes})


@pytest.mark.parametrize("declared", [True, False])
async def test_oversized_output_is_refused_while_streaming(
    mock: respx.MockRouter, http: httpx.AsyncClient, declared: bool
) -> None:
    body = Chunks(64 * 1024, 1024)  # 64 MiB
    headers = {"Content-Length": str(64 * 1024 * 1024)} if declared else {}
    mock.get(OUT).mock(return_value=httpx.Response(200, headers=headers, stream=body))
    with pytest.raises(UpstreamError, match="larger than the limit") as err:
        await FalProvider(http, capped(2**20)).fetch(ProviderImage(url=OUT))
    assert body.sent == (0 if declared else 17)
    assert not err.value.retryable


async def test_fetch_follows_redirects_and_maps_failures(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    provider = FalProvider(http, settings())
    mock.get(OUT).respond(302, headers={"Location": "https://cdn.example/o.png"})
    mock.get("https://cdn.example/o.png").respond(200, content=b"png")
    assert await provider.fetch(ProviderImage(url=OUT)) == b"png"
    mock.get("https://cdn.example/o.png").respond(403, text="denied")
    with pytest.raises(UpstreamError, match="HTTP 403"):
        await provider.fetch(ProviderImage(url=OUT))
    mock.get("https://cdn.example/o.png").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(UpstreamTimeout) as err:
        await provider.fetch(ProviderImage(url=OUT))
    assert not err.value.retryable


async def test_fetch_decodes_a_data_uri_within_the_cap(http: httpx.AsyncClient) -> None:
    provider = FalProvider(http, capped(8))
    assert await provider.fetch(ProviderImage(url="data:image/png;base64,cG5n")) == b"png"
    with pytest.raises(UpstreamError, match="larger than the limit"):
        await provider.fetch(ProviderImage(url="data:image/png;base64," + "AAAA" * 4))
