"""`GET /v1/models` and `GET /v1/models/{model_id}` in OpenAI's shapes, from `app.state.catalog`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request

from imagegate.auth.middleware import client_of
from imagegate.core.errors import ModelNotFound

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """`{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}, ...]}`."""
    client = client_of(request)  # a client key sees only the models it may use
    entries = [e for e in request.app.state.catalog if client is None or client.allows(e.id)]
    return {"object": "list", "data": [entry.as_openai_model() for entry in entries]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(request: Request, model_id: str) -> dict[str, object]:
    """One model; an unknown id is the catalog's 404 `model_not_found`."""
    client = client_of(request)
    if client is not None and not client.allows(model_id):
        raise ModelNotFound(f"The model `{model_id}` does not exist or you do not have access to it.", param="model")
    model: dict[str, object] = request.app.state.catalog.get(model_id).as_openai_model()
    return model
