"""`GET /v1/models` and `GET /v1/models/{model_id}` in OpenAI's shapes, from `app.state.catalog`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """`{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}, ...]}`."""
    return {"object": "list", "data": [entry.as_openai_model() for entry in request.app.state.catalog]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(request: Request, model_id: str) -> dict[str, object]:
    """One model; an unknown id is the catalog's 404 `model_not_found`."""
    model: dict[str, object] = request.app.state.catalog.get(model_id).as_openai_model()
    return model
