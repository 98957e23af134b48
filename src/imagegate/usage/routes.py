"""`GET /v1/usage`: the calling key's totals; every key's for an `admin: true` key (and on an open
gateway, where all requests count as `anonymous`).

    {"object": "list", "data": [{"object": "imagegate.usage", "key": "team-a", "requests": 3,
     "images": 5, "megapixels": 5.24288, "cost_usd": 0.15}]}
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request

from imagegate.auth.middleware import client_of

__all__ = ["ANONYMOUS", "router"]

ANONYMOUS = "anonymous"  # the name an open gateway counts under (reserved: no key may have it)
router = APIRouter()


@router.get("/v1/usage")
async def usage(request: Request) -> dict[str, Any]:
    ledger = request.app.state.access.ledger
    client = client_of(request)
    names = None if client is None or client.admin else [client.name]
    totals = await ledger.totals(names)
    return {"object": "list", "data": [t.as_json(name) for name, t in totals.items()]}
