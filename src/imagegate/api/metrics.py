"""`GET /metrics`: Prometheus text format (every worker's values when serving with several)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from imagegate.observability.metrics import CONTENT_TYPE, Metrics

__all__ = ["router"]

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    body = await asyncio.to_thread(registry.render)  # multiprocess mode reads one file per worker
    return Response(body, media_type=CONTENT_TYPE)
