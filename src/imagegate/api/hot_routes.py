"""`POST /v1/images/generations` and `POST /v1/images/edits` without FastAPI's per-request layers.

FastAPI serves a request through a dozen layers (its error and telemetry middleware, an exit
stack, the router's matching, the route's request handler with its dependency solver), each with
its own `send` wrapper; for the two image routes, which carry the traffic, they were about a fifth
of the gateway's CPU per request. `Gateway` (the app class `create_app` builds) hands `POST` on
exactly those two paths to a stack composed at the first request:

    Starlette's ServerErrorMiddleware, with the app's 500 handler (as FastAPI's stack: an error
    raised after the response started is handed to it too, its log line, then re-raised)
      -> the app's own middleware (`app.user_middleware`: the same classes, arguments and
         order: observability, request context, auth, admission)
      -> `RouteEndpoint`: the route's endpoint as pure ASGI, with the app's exception handlers

What it leaves out, and why a client cannot tell:

    FastAPI's OpenTelemetry       only active when a tracer, meter or logger provider is configured
                                  (at start, e.g. by `opentelemetry-instrument`): then every request
                                  goes through FastAPI, as before. It is checked at the first request
    AppBodyLimitMiddleware        idle: FastAPI's `max_body_size` is not set (`limits.max_body_bytes`
                                  is ours, in `RequestContextMiddleware`); set, it keeps FastAPI's path
    ExceptionMiddleware, request_response
                                  `RouteEndpoint` looks the handler up the same way
    AsyncExitStackMiddleware, dependencies
                                  the endpoints take only the `Request`; the parser closes uploads
    the router                    the path is compared whole, and only where the first route that
                                  fully matches POST on it is the image route; the scope gets the
                                  same `route`, `endpoint`, `path_params` and `router`

Everything else goes to FastAPI as before: other paths and methods (a GET here is FastAPI's 405),
a trailing slash, a `root_path`. The routes stay registered on FastAPI, so `/openapi.json` and the
FastAPI path itself are unchanged (`hot_routes = False` switches the lean stack off).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette._exception_handler import _lookup_exception_handler
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HOT_PATHS", "Gateway", "RouteEndpoint"]

HOT_PATHS = ("/v1/images/generations", "/v1/images/edits")
Handler = Callable[[Request, Exception], Any]  # an app exception handler, for an HTTP request
_PLAIN_CALL = Response.__call__


class RouteEndpoint:
    """`endpoint(request) -> Response` as pure ASGI, with exception handlers looked up as Starlette's
    `ExceptionMiddleware` does: an HTTPException by its status first, then by the exception's class
    and its bases; no handler, or a handled error after the response started, propagates."""

    def __init__(
        self,
        endpoint: Callable[[Request], Awaitable[Response]],
        *,
        handlers: Mapping[type[Exception], Handler],
        status_handlers: Mapping[int, Handler],
    ) -> None:
        self.endpoint = endpoint
        self.handlers = dict(handlers)
        self.status_handlers = dict(status_handlers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        started = False
        try:
            response = await self.endpoint(request)
            if type(response).__call__ is _PLAIN_CALL and response.background is None:
                # Starlette's own `Response.__call__` sends the start first, so anything it raises
                # comes after the start was handed to `send` (as a `send` wrapper would record):
                # the common response goes out without one.
                started = True
                await response(scope, receive, send)
            else:

                async def sender(message: Message) -> None:
                    nonlocal started
                    if message["type"] == "http.response.start":
                        started = True
                    await send(message)

                await response(scope, receive, sender)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            if started:
                raise RuntimeError("Caught handled exception, but response already started.") from exc
            if is_async_callable(handler):
                answer = await handler(request, exc)
            else:
                answer = await run_in_threadpool(handler, request, exc)
            if answer is not None:
                await answer(scope, receive, send)
            exc.__traceback__ = None  # as Starlette: a reused exception would pile up tracebacks

    def _handler(self, exc: Exception) -> Handler | None:
        if isinstance(exc, HTTPException) and exc.status_code in self.status_handlers:
            return self.status_handlers[exc.status_code]
        return _lookup_exception_handler(self.handlers, exc)  # type: ignore[arg-type,return-value]


class Gateway(FastAPI):
    """FastAPI, with `POST` on `HOT_PATHS` served by the lean stack (see the module docstring)."""

    hot_routes = True  # False: every request goes through FastAPI (the tests compare both)
    _hot: dict[str, tuple[ASGIApp, dict[str, Any]]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.hot_routes and not scope.get("root_path"):
            hot = (self._hot if self._hot is not None else self._build_hot()).get(scope["path"])
            if hot is not None:
                stack, route_scope = hot
                scope["app"] = self
                scope.update(route_scope)
                scope["path_params"] = {}
                await stack(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _traced(self) -> bool:
        """Whether FastAPI's own OpenTelemetry instrumentation is on (a tracer, meter or logger provider
        is configured): asked once, at the first request, not per request as FastAPI does (3.5 us)."""
        native = getattr(self, "_native_telemetry", None)
        return native is not None and bool(native.enabled())

    def _build_hot(self) -> dict[str, tuple[ASGIApp, dict[str, Any]]]:
        """The lean stack of each hot path whose POST route is registered (once, at the first request;
        FastAPI's own stack is built with it, so no middleware can be added after)."""
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        error_handler: Handler | None = None
        handlers: dict[type[Exception], Handler] = {}
        status_handlers: dict[int, Handler] = {}
        for key, handler in self.exception_handlers.items():
            if key in (500, Exception):  # FastAPI gives these to ServerErrorMiddleware, as below
                error_handler = handler
                continue
            if isinstance(key, int):
                status_handlers[key] = handler
            else:
                handlers[key] = handler
        hot: dict[str, tuple[ASGIApp, dict[str, Any]]] = {}
        if self.root_path or getattr(self, "max_body_size", None) is not None or self._traced():
            self._hot = hot
            return hot
        decided: set[str] = set()
        for route, plain in _routes(self.router.routes, plain=True):
            path = next((p for p in HOT_PATHS if p not in decided and _takes_post(route, p)), None)
            if path is None:
                continue
            decided.add(path)  # the route FastAPI would pick for POST here: lean only if it is a plain one
            if (
                plain
                and isinstance(route, APIRoute)
                and route.path == path
                and route.methods == {"POST"}
                and _takes_only_request(route)
            ):
                stack: ASGIApp = RouteEndpoint(route.endpoint, handlers=handlers, status_handlers=status_handlers)
                for cls, args, kwargs in reversed(self.user_middleware):
                    stack = cls(stack, *args, **kwargs)
                stack = ServerErrorMiddleware(stack, handler=error_handler, debug=self.debug)
                hot[path] = (stack, {"route": route, "endpoint": route.endpoint, "router": self.router})
        self._hot = hot
        return hot


def _routes(routes: Any, *, plain: bool, depth: int = 0) -> Iterator[tuple[Any, bool]]:
    """Every route in the router's order, inside included routers too, each with whether everything
    around it is plain: no inclusion adds a prefix, dependencies or a body limit."""
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner is None or depth >= 4:
            yield route, plain
            continue
        context = getattr(route, "include_context", None)
        bare = not (getattr(context, "prefix", "") or getattr(context, "dependencies", None))
        bare = bare and getattr(context, "max_body_size", None) is None
        yield from _routes(inner, plain=plain and bare, depth=depth + 1)


def _takes_post(route: Any, path: str) -> bool:
    """Whether `route` fully matches POST on `path` (as the router asks it: any template, a mount);
    a route that cannot tell counts as taking it, so the path stays FastAPI's."""
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": [], "query_string": b""}
    try:
        match, _ = route.matches(scope)
    except Exception:
        return True
    return bool(match is Match.FULL)


def _takes_only_request(route: APIRoute) -> bool:
    """The endpoint's only parameter is the Request: FastAPI resolves nothing for it."""
    dependant = route.dependant
    return not (
        dependant.dependencies
        or dependant.path_params
        or dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
        or dependant.body_params
    )
