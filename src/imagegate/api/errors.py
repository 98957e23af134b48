"""Every error the HTTP layer sends, rendered as OpenAI's envelope, plus the request middleware.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}   (all four keys, always)

Where each failure is rendered:

    GatewayError               -> its own status and envelope (`gateway_error_response`)
    RequestValidationError     -> 400 invalid_request_error naming the param (never 422 {"detail"})
    Starlette HTTPException    -> its status (404 unknown route, 405, 400 bad multipart, ...)
    any other Exception        -> 500 server_error with a generic message; the traceback is logged

Headers: `x-request-id` on every response (`RequestContextMiddleware`); `retry-after` and
`retry-after-ms` on 429/503 when the delay is known; `x-should-retry: false` on a >=500 (or a 429)
after costly upstream work (`GatewayError.costly`), so SDKs do not pay for the same job again.

`RequestContextMiddleware` is pure ASGI (a streamed response is never buffered). It assigns the
request id (`req_<32 hex>`, or a sane incoming `x-request-id`), exposes it as
`request.state.request_id`, and enforces `limits.max_body_bytes`: from `Content-Length` before
the app runs, and while the body streams in (a `PayloadTooLarge` raised from `receive`), so an
oversized upload is refused before it is buffered whole.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegate.core.errors import GatewayError, InternalError, InvalidRequest, PayloadTooLarge

__all__ = [
    "GENERIC_SERVER_ERROR",
    "REQUEST_ID_HEADER",
    "RequestContextMiddleware",
    "error_body",
    "error_response",
    "gateway_error_response",
    "install",
    "new_request_id",
    "request_id_of",
]

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_KEY = REQUEST_ID_HEADER.encode("latin-1")
_SANE_REQUEST_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}\Z")
GENERIC_SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"
_HTTP_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


# Request ids draw from a generator of their own, seeded from os.urandom (and again in a forked
# child): an id names a request in logs and support tickets and grants nothing, so it needs
# uniqueness, not secrecy, and `secrets.token_hex` cost a system call per request.
_ID_BITS = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ID_BITS.seed)


def new_request_id() -> str:
    """`req_` and 32 lower-case hex digits (128 random bits)."""
    return f"req_{_ID_BITS.getrandbits(128):032x}"


def request_id_of(request: Request) -> str:
    """The id the middleware gave this request (a fresh one if the middleware is not installed)."""
    state = request.scope.setdefault("state", {})
    rid = state.get("request_id")
    if not isinstance(rid, str):
        rid = new_request_id()
        state["request_id"] = rid
    return rid


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def gateway_error_response(exc: GatewayError, request_id: str | None = None) -> JSONResponse:
    """The JSON response for a GatewayError, with its retry headers."""
    headers: dict[str, str] = {}
    if exc.status in (429, 503) and exc.retry_after is not None and math.isfinite(exc.retry_after):
        delay = max(0.0, exc.retry_after)
        headers["retry-after"] = str(math.ceil(delay))
        headers["retry-after-ms"] = str(round(delay * 1000))
    if (exc.status >= 500 or exc.status == 429) and (exc.costly or not exc.client_retry):
        headers["x-should-retry"] = "false"
    headers.update(getattr(exc, "extra_headers", None) or {})  # e.g. a 429's x-ratelimit-* headers
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    return JSONResponse(exc.envelope(), status_code=exc.status, headers=headers)


def _log_gateway_error(exc: GatewayError, request_id: str | None) -> None:
    if exc.status >= 500 and exc.code != "server_busy":  # the in-flight budget logs those once per interval
        logger.warning(
            "request %s failed: %r (provider=%s, upstream_request_id=%s)",
            request_id,
            exc,
            exc.provider,
            exc.upstream_request_id,
        )


def error_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    """Log and render any exception: a GatewayError as itself, anything else as a generic 500
    (the traceback goes to the log, never to the client)."""
    if isinstance(exc, GatewayError):
        _log_gateway_error(exc, request_id)
        return gateway_error_response(exc, request_id)
    logger.error("request %s: unhandled error", request_id, exc_info=exc)
    return gateway_error_response(InternalError(GENERIC_SERVER_ERROR), request_id)


async def _gateway_error_handler(request: Request, exc: Exception) -> Response:
    return error_response(exc, request_id_of(request))


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "cookie", "form")]
    if not parts:
        return None
    head, rest = parts[0], parts[1:]
    return head + "".join(f"[{p}]" for p in rest)


async def _validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    param = _validation_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "Invalid request."))
    message = f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}."
    if first.get("type") == "missing" and param:
        message = f"Missing required parameter: '{param}'."
    invalid = InvalidRequest(message, param=param)
    return gateway_error_response(invalid, request_id_of(request))


async def _http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    route = f"{request.method} {request.url.path}"
    if status == 404:
        message = f"Invalid URL ({route})"
    elif status == 405:
        message = f"Method not allowed ({route})"
    else:
        message = str(exc.detail) if exc.detail else "Invalid request."
    body = error_body(
        message,
        "server_error" if status >= 500 else "invalid_request_error",
        code=_HTTP_CODES.get(status),
    )
    headers = dict(exc.headers or {})
    headers[REQUEST_ID_HEADER] = request_id_of(request)
    if status < 200 or status in (204, 304):  # no body allowed
        return Response(status_code=status, headers=headers)
    return JSONResponse(body, status_code=status, headers=headers)


async def _unhandled_error_handler(request: Request, exc: Exception) -> Response:
    """Last resort (Starlette's ServerErrorMiddleware): errors raised outside our middleware."""
    return error_response(exc, request_id_of(request))


class RequestContextMiddleware:
    """Request id + body-size limit + last-resort error rendering, as pure ASGI.

    `max_body_bytes=None` reads `app.state.settings.limits.max_body_bytes` on every request
    (through `scope["app"]`), so the middleware can be installed before the settings are set.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _limit(self, scope: Scope) -> int | None:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        app = scope.get("app")
        settings = getattr(getattr(app, "state", None), "settings", None)
        limits = getattr(settings, "limits", None)
        value = getattr(limits, "max_body_bytes", None)
        return value if isinstance(value, int) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        incoming, declared = _headers(scope, b"x-request-id", b"content-length")
        rid = incoming if incoming is not None and _SANE_REQUEST_ID.match(incoming) else new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        limit = self._limit(scope)
        started = False
        rid_value = rid.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = _with_header(message["headers"], _REQUEST_ID_KEY, rid_value)
            await send(message)

        if limit is not None:
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                too_large = (
                    _too_large(limit) if declared.isdigit() else InvalidRequest("Invalid Content-Length header.")
                )
                await gateway_error_response(too_large, rid)(scope, receive, send_with_id)
                return
            receive = _limited_receive(receive, limit)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # the client left (or was cut for reading too slowly): nobody to answer
            logger.info("request %s: the client disconnected before its body was complete", rid)
        except Exception as exc:
            if started:
                logger.error("request %s: error after the response started", rid, exc_info=exc)
                raise
            await error_response(exc, rid)(scope, receive, send_with_id)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is too large; the limit is {limit} bytes.")


def _limited_receive(receive: Receive, limit: int) -> Receive:
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit)
        return message

    return limited


def _headers(scope: Scope, first: bytes, second: bytes) -> tuple[str | None, str | None]:
    """The first value of each of two headers (names in lower case), stripped; one pass."""
    found: list[str | None] = [None, None]
    for key, value in scope.get("headers", ()):
        key = key.lower()
        index = 0 if key == first else 1 if key == second else -1
        if index >= 0 and found[index] is None:
            found[index] = bytes(value).decode("latin-1").strip()
    return found[0], found[1]


def _with_header(headers: Any, name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    """`MutableHeaders(raw=...)[name] = value`: the first `name` entry replaced, later ones dropped,
    else appended (order kept)."""
    out = list(headers)
    found = [i for i, (key, _) in enumerate(out) if key == name]
    for i in reversed(found[1:]):
        del out[i]
    if found:
        out[found[0]] = (name, value)
    else:
        out.append((name, value))
    return out


def install(app: FastAPI, *, max_body_bytes: int | None = None) -> None:
    """Register the envelope handlers and the request middleware on `app`.

    `max_body_bytes` defaults to `app.state.settings.limits.max_body_bytes`, read per request."""
    app.add_exception_handler(GatewayError, _gateway_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(HTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, _unhandled_error_handler)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=max_body_bytes)
