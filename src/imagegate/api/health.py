"""`GET /healthz` (liveness: the process answers) and `GET /readyz` (readiness).

Ready means: the catalog has at least one model, the storage is writable (`Storage.ready()`;
by default a one-byte put/get round trip, LocalStorage checks its directory) and, when `redis.url`
is set, Redis answers a PING.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from imagegate.api.errors import gateway_error_response, request_id_of
from imagegate.core.errors import InternalError
from imagegate.state.redis import ping as redis_ping
from imagegate.storage.base import Storage

__all__ = ["router"]

logger = logging.getLogger(__name__)
router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> dict[str, Any] | Response:
    state = request.app.state
    models = len(state.catalog)
    problems: list[str] = []
    if models == 0:
        problems.append("the catalog has no models")
    if not await _storage_writable(state.storage):
        problems.append("the image storage is not writable")
    redis = getattr(state, "redis", None)
    if redis is not None and not await redis_ping(redis):
        problems.append("Redis is unreachable")
    if problems:
        not_ready = InternalError(f"Not ready: {'; '.join(problems)}.", code="not_ready", status=503)
        return gateway_error_response(not_ready, request_id_of(request))
    return {"status": "ready", "models": models}


async def _storage_writable(storage: Storage) -> bool:
    try:
        return await storage.ready()
    except Exception:
        logger.warning("readiness: storage check failed", exc_info=True)
        return False
