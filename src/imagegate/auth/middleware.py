"""`AuthMiddleware`: pure ASGI, in front of every route.

Every `/v1/...` route needs a configured key, sent as `Authorization: Bearer <key>` or
`api-key: <key>` (Azure-style clients; another `Authorization` scheme, such as `Basic`, is a 401
that says to use Bearer), except `GET /v1/files/images/{id}` (its ids are
unguessable). `/healthz`, `/readyz`, `/metrics` and the docs stay open. A missing or unknown key is
401 `invalid_api_key` in OpenAI's envelope, answered before the body is read. Every HTTP request
gets `request.state.key_name` (the key's name, or None: open gateway or open route) and
`request.state.client_key` (the `ClientKey`, or None). With no keys configured nothing is checked.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from imagegate.api.errors import gateway_error_response
from imagegate.auth.keys import ClientKey, KeyRing
from imagegate.core.errors import AuthenticationFailed

__all__ = ["AuthMiddleware", "client_of", "presented_keys"]

_PROTECTED = "/v1/"
_OPEN = ("/v1/files/images/",)
_MAX_PRESENTED = 4  # repeated headers cannot multiply the work
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,19}")  # a scheme name safe to quote back


def client_of(request: Request) -> ClientKey | None:
    """The authenticated client of a request (None: the gateway is open)."""
    client = request.scope.get("state", {}).get("client_key")
    return client if isinstance(client, ClientKey) else None


def presented_keys(scope: Scope) -> list[str]:
    """The keys a request presents: the Bearer token, then the `api-key` header."""
    keys: list[str] = []
    for name, raw in scope.get("headers", ()):
        name = bytes(name).lower()
        if name == b"authorization":
            scheme, _, token = bytes(raw).decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                keys.insert(0, token.strip())
        elif name == b"api-key":
            value = bytes(raw).decode("latin-1").strip()
            if value:
                keys.append(value)
    return keys[:_MAX_PRESENTED]


def _other_scheme(scope: Scope) -> str | None:
    """The scheme of an `Authorization` header that is not Bearer ("" if it is not a sane name)."""
    for name, raw in scope.get("headers", ()):
        if bytes(name).lower() == b"authorization":
            scheme = bytes(raw).decode("latin-1").strip().partition(" ")[0]
            if scheme and scheme.lower() != "bearer":
                return scheme if _SCHEME.fullmatch(scheme) else ""
    return None


def _missing_key_message(scope: Scope) -> str:
    scheme = _other_scheme(scope)
    if scheme is None:
        return "You didn't provide an API key. Send it as `Authorization: Bearer <key>` or as `api-key: <key>`."
    named = f"the `{scheme}` scheme" if scheme else "an unsupported scheme"
    return (
        f"The Authorization header uses {named}: send the API key as `Authorization: Bearer <key>` "
        "(or as `api-key: <key>`)."
    )


def _is_open(path: str) -> bool:
    """`/v1/files/images/<one segment>` and nothing else below /v1/."""
    return any(
        path.startswith(p) and "/" not in path[len(p) :] and path[len(p) :] not in ("", ".", "..") for p in _OPEN
    )


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, keyring: KeyRing) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["key_name"] = None
        state["client_key"] = None
        path: str = scope.get("path", "")
        if self.keyring.open or not path.startswith(_PROTECTED) or _is_open(path):
            await self.app(scope, receive, send)
            return
        presented = presented_keys(scope)
        client = self.keyring.authenticate(presented)
        if client is None:
            failure = AuthenticationFailed("Incorrect API key provided." if presented else _missing_key_message(scope))
            response = gateway_error_response(failure, state.get("request_id"))
            response.headers["www-authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        state["key_name"] = client.name
        state["client_key"] = client
        await self.app(scope, receive, send)
