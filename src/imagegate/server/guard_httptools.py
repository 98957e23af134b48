"""uvicorn's httptools protocol with the read timeouts and the connection cap of `guard`
(a module of its own: it imports httptools, an optional speed-up)."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from imagegate.server.guard import _GuardMixin

__all__ = ["GuardedHttpToolsProtocol"]


class GuardedHttpToolsProtocol(_GuardMixin, HttpToolsProtocol):
    """uvicorn's httptools protocol with read timeouts and the connection cap."""
