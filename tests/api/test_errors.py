"""api.errors: one envelope for every failure, request ids, retry headers, the body-size limit."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI, Request
from starlette.datastructures import MutableHeaders
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import Response

from imagegate.api import errors
from imagegate.core.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    ProviderUnavailable,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)

ENVELOPE_KEYS = {"message", "type", "param", "code"}
REQUEST_ID = re.compile(r"^req_[0-9a-f]{32}$")
LIMIT = 1000


def raising_app(error: BaseException | None = None, **install: Any) -> tuple[FastAPI, list[bytes]]:
    app = FastAPI()
    errors.install(app, **install)
    bodies: list[bytes] = []

    @app.post("/raise")
    async def raise_it() -> dict[str, str]:
        assert error is not None
        raise error

    @app.get("/typed")
    async def typed(n: int) -> dict[str, int]:
        return {"n": n}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        body = await request.body()
        bodies.append(body)
        return {"length": len(body)}

    @app.get("/rid")
    async def rid(request: Request) -> dict[str, str]:
        return {"request_id": errors.request_id_of(request)}

    return app, bodies


async def post(app: FastAPI, path: str = "/raise", **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(path, **kwargs)


async def get(app: FastAPI, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, **kwargs)


def assert_envelope(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_KEYS
    assert REQUEST_ID.match(response.headers["x-request-id"])
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize(
    ("error", "status", "type_", "code"),
    [
        (InvalidRequest("bad size", param="size"), 400, "invalid_request_error", "invalid_value"),
        (AuthenticationFailed("no key"), 401, "authentication_error", "invalid_api_key"),
        (ModelNotFound("The model `x` does not exist"), 404, "invalid_request_error", "model_not_found"),
        (PayloadTooLarge("too big", param="image"), 413, "invalid_request_error", "payload_too_large"),
        (RateLimited("slow down"), 429, "rate_limit_error", "rate_limit_exceeded"),
        (UpstreamError("provider failed"), 502, "upstream_error", "upstream_error"),
        (ProviderUnavailable("overloaded"), 503, "upstream_error", "provider_unavailable"),
        (UpstreamTimeout("too slow"), 504, "upstream_error", "upstream_timeout"),
    ],
)
async def test_gateway_errors_render_their_envelope(error: GatewayError, status: int, type_: str, code: str) -> None:
    app, _ = raising_app(error)
    body = assert_envelope(await post(app), status)
    assert body == {"message": error.message, "type": type_, "param": error.param, "code": code}


@pytest.mark.parametrize(
    ("error", "exception"),
    [
        (InvalidRequest("bad", param="n"), openai.BadRequestError),
        (AuthenticationFailed("no key"), openai.AuthenticationError),
        (ModelNotFound("no model"), openai.NotFoundError),
        (PayloadTooLarge("too big"), openai.APIStatusError),
        (RateLimited("slow"), openai.RateLimitError),
        (UpstreamError("failed"), openai.InternalServerError),
        (ProviderUnavailable("down"), openai.InternalServerError),
        (RuntimeError("boom"), openai.InternalServerError),
    ],
)
async def test_the_sdk_raises_the_matching_class(error: BaseException, exception: type[openai.APIStatusError]) -> None:
    app, _ = raising_app(error)
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
    async with openai.AsyncOpenAI(api_key="x", base_url="http://test", http_client=http, max_retries=0) as sdk:
        with pytest.raises(exception) as info:
            await sdk.post("/raise", cast_to=object)
    assert type(info.value) is exception
    assert info.value.request_id and REQUEST_ID.match(info.value.request_id)
    assert isinstance(info.value.body, dict) and set(info.value.body) == ENVELOPE_KEYS


@pytest.mark.parametrize(("status", "error_cls"), [(429, RateLimited), (503, ProviderUnavailable)])
async def test_retry_after_headers_when_known(status: int, error_cls: type[GatewayError]) -> None:
    app, _ = raising_app(error_cls("wait", retry_after=2.25))
    response = await post(app)
    assert response.status_code == status
    assert response.headers["retry-after"] == "3" and response.headers["retry-after-ms"] == "2250"


async def test_no_retry_after_when_unknown_or_not_429_503() -> None:
    app, _ = raising_app(RateLimited("wait"))
    assert "retry-after" not in (await post(app)).headers
    app, _ = raising_app(UpstreamError("failed", retry_after=5))
    assert "retry-after" not in (await post(app)).headers


async def test_costly_server_errors_say_do_not_retry() -> None:
    costly = UpstreamTimeout("the job timed out")
    costly.costly = True
    app, _ = raising_app(costly)
    response = await post(app)
    assert response.status_code == 504 and response.headers["x-should-retry"] == "false"

    cheap = UpstreamError("not accepted")
    app, _ = raising_app(cheap)
    assert "x-should-retry" not in (await post(app)).headers

    costly_client_error = InvalidRequest("bad")
    costly_client_error.costly = True
    app, _ = raising_app(costly_client_error)
    assert "x-should-retry" not in (await post(app)).headers


async def test_unexpected_errors_are_generic_500s_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = raising_app(RuntimeError("db password hunter2 at /srv/secret.py"))
    with caplog.at_level(logging.ERROR, logger="imagegate.api.errors"):
        response = await post(app)
    body = assert_envelope(response, 500)
    assert body["type"] == "server_error" and body["param"] is None
    assert "hunter2" not in response.text and "secret" not in response.text
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None and "hunter2" in str(record.exc_info[1])
    assert response.headers["x-request-id"] in record.getMessage()


async def test_unknown_route_and_wrong_method() -> None:
    app, _ = raising_app()
    missing = assert_envelope(await post(app, "/v1/nope"), 404)
    assert missing["type"] == "invalid_request_error" and "/v1/nope" in missing["message"]
    response = await get(app, "/echo")
    wrong = assert_envelope(response, 405)
    assert wrong["code"] == "method_not_allowed" and response.headers["allow"] == "POST"


async def test_validation_errors_are_400_naming_the_param() -> None:
    app, _ = raising_app()
    bad = assert_envelope(await get(app, "/typed", params={"n": "abc"}), 400)
    assert bad["param"] == "n" and bad["type"] == "invalid_request_error"
    missing = assert_envelope(await get(app, "/typed"), 400)
    assert missing["param"] == "n" and missing["message"] == "Missing required parameter: 'n'."


async def test_errors_outside_the_middleware_still_get_an_envelope() -> None:
    app, _ = raising_app()

    async def explode(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        raise RuntimeError("outer middleware broke")

    app.add_middleware(BaseHTTPMiddleware, dispatch=explode)  # added last = outermost
    body = assert_envelope(await get(app, "/rid"), 500)
    assert "outer middleware" not in body["message"]


# -- request ids -----------------------------------------------------------------------------------


async def test_request_id_is_generated_exposed_and_sent() -> None:
    app, _ = raising_app()
    response = await get(app, "/rid")
    assert REQUEST_ID.match(response.headers["x-request-id"])
    assert response.json()["request_id"] == response.headers["x-request-id"]
    other = await get(app, "/rid")
    assert other.headers["x-request-id"] != response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [("abc-123_X.y:z", True), ("req_" + "0" * 32, True), ("x" * 129, False), ("has space", False), ("ünï", False)],
)
async def test_incoming_request_id_is_reused_only_when_sane(incoming: str, kept: bool) -> None:
    app, _ = raising_app()
    response = await get(app, "/rid", headers={"x-request-id": incoming.encode()})
    sent = response.headers["x-request-id"]
    assert (sent == incoming) is kept
    assert response.json()["request_id"] == sent
    if not kept:
        assert REQUEST_ID.match(sent)


# -- body size -------------------------------------------------------------------------------------


async def test_declared_oversized_body_is_refused_before_the_app_runs() -> None:
    app, bodies = raising_app(max_body_bytes=LIMIT)
    body = assert_envelope(await post(app, "/echo", content=b"x" * (LIMIT + 1)), 413)
    assert body["code"] == "payload_too_large" and str(LIMIT) in body["message"]
    assert bodies == []
    ok = await post(app, "/echo", content=b"x" * LIMIT)
    assert ok.status_code == 200 and ok.json() == {"length": LIMIT}


async def test_streamed_oversized_body_is_refused_while_reading() -> None:
    app, bodies = raising_app(max_body_bytes=LIMIT)
    chunks_sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        for _ in range(50):
            chunks_sent += 1
            yield b"y" * 100

    response = await post(app, "/echo", content=chunks())  # chunked: no Content-Length
    assert_envelope(response, 413)
    assert bodies == []
    assert chunks_sent < 50  # refused while streaming, not after buffering everything


async def test_bad_content_length_is_400() -> None:
    app, _ = raising_app(max_body_bytes=LIMIT)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        request = client.build_request("POST", "/echo", content=b"abc")
        request.headers["content-length"] = "12abc"
        response = await client.send(request)
    assert_envelope(response, 400)


async def test_limit_comes_from_settings_when_not_given() -> None:
    app, _ = raising_app()

    class Limits:
        max_body_bytes = 10

    class Settings:
        limits = Limits()

    app.state.settings = Settings()
    assert_envelope(await post(app, "/echo", content=b"z" * 11), 413)
    assert (await post(app, "/echo", content=b"z" * 10)).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        [],
        [(b"content-type", b"application/json")],
        [(b"x-request-id", b"old"), (b"content-type", b"text/plain")],
        [(b"a", b"1"), (b"x-request-id", b"one"), (b"b", b"2"), (b"x-request-id", b"two"), (b"x-request-id", b"3")],
    ],
)
def test_the_request_id_header_is_set_as_mutable_headers_sets_it(raw: list[tuple[bytes, bytes]]) -> None:
    message = {"headers": list(raw)}
    MutableHeaders(scope=message)["x-request-id"] = "req_new"
    assert errors._with_header(tuple(raw), b"x-request-id", b"req_new") == message["headers"]


def test_the_request_headers_are_read_first_value_stripped_in_one_pass() -> None:
    scope = {"headers": [(b"Content-Length", b" 12 "), (b"x-request-id", b"a"), (b"X-Request-Id", b"b")]}
    assert errors._headers(scope, b"x-request-id", b"content-length") == ("a", "12")
    assert errors._headers({"headers": []}, b"x-request-id", b"content-length") == (None, None)


def test_request_ids_are_unique_and_differ_in_a_forked_child() -> None:
    """Ids come from a generator seeded from os.urandom, reseeded after a fork: two worker
    processes forked from one parent must not hand out the same ids."""
    ids = {errors.new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(REQUEST_ID.match(rid) for rid in ids)
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, errors.new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    assert REQUEST_ID.match(child) and child != errors.new_request_id()
