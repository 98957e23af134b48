"""`GET /v1/files/images/{image_id}`: rehosted output images (`response_format=url`) until they expire."""

from __future__ import annotations

import math
import time

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from imagegate.core.errors import NotFound

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/files/images/{image_id}")
async def get_image(request: Request, image_id: str) -> Response:
    """The stored bytes with their Content-Type and `Cache-Control: private, max-age=<seconds left>`.
    Unknown, malformed and expired ids are all the same 404."""
    stored = await request.app.state.storage.get(image_id)
    if stored is None:
        raise NotFound(f"No image with id '{image_id}' exists, or it has expired.", param="image_id")
    remaining = max(0, math.floor(stored.expires_at - time.time()))
    return Response(
        content=stored.data,
        media_type=stored.content_type,
        headers={"cache-control": f"private, max-age={remaining}", "x-content-type-options": "nosniff"},
    )
