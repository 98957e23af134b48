"""Async image jobs over HTTP (README "Async image jobs").

- `POST /v1/images/edits|generations` with `Prefer: respond-async` (see `wants_async`): the
  request is parsed and validated as usual (a bad one is a 4xx at once), then stored as a job:
  `202 Accepted`, `Location: /v1/images/jobs/{id}`, the job as the body.
- `GET /v1/images/jobs/{id}`: the job (with the synchronous call's `x-imagegate-*` headers once
  it succeeded); `GET /v1/images/jobs`: the key's jobs, newest first (`after`, `limit`, `status`);
  `POST /v1/images/jobs/{id}/cancel`; `GET /v1/images/jobs/{id}/events`: Server-Sent Events.

Jobs belong to the key that made them: another key gets 404.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from imagegate.access import service_for
from imagegate.api.render import json_response
from imagegate.api.wire import base_url as base_url_of
from imagegate.api.wire import header_values
from imagegate.auth.middleware import client_of
from imagegate.core.errors import InvalidRequest
from imagegate.core.request import ImageRequest
from imagegate.idempotency.guard import IDEMPOTENCY_HEADER, REPLAYED_HEADER
from imagegate.jobs.service import JobService, public_headers
from imagegate.usage.routes import ANONYMOUS

__all__ = ["router", "submit_job", "wants_async"]

router = APIRouter()
_KEEPALIVE_SECONDS = 15.0


def wants_async(request: Request) -> bool:
    """`Prefer: respond-async` (RFC 7240; among other preferences, case-insensitive)."""
    for value in header_values(request, b"prefer"):
        for preference in value.split(","):
            if preference.split(";", 1)[0].strip().lower() == "respond-async":
                return True
    return False


def _jobs(request: Request) -> JobService:
    jobs: JobService = request.app.state.jobs
    return jobs


def _key(request: Request) -> str:
    client = client_of(request)
    return client.name if client is not None else ANONYMOUS


async def submit_job(request: Request, image_request: ImageRequest) -> Response:
    base_url = base_url_of(request)
    job, replayed = await _jobs(request).submit(
        image_request,
        client=client_of(request),
        key=_key(request),
        base_url=base_url,
        validator=service_for(request),
        idempotency_key=request.headers.get(IDEMPOTENCY_HEADER),
    )
    headers = {"location": f"/v1/images/jobs/{job.id}"}
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    return JSONResponse(job.public(), status_code=202, headers=headers)


@router.get("/v1/images/jobs")
async def list_jobs(request: Request) -> Response:
    query = request.query_params
    raw_limit = query.get("limit", "20")
    if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= 100):
        raise InvalidRequest("`limit` must be an integer from 1 to 100.", param="limit")
    jobs, has_more = await _jobs(request).page(
        _key(request), limit=int(raw_limit), after=query.get("after"), status=query.get("status")
    )
    data = [job.public() for job in jobs]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


@router.get("/v1/images/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> Response:
    job = await _jobs(request).get(job_id, _key(request))
    return await json_response(job.public(), headers=public_headers(job.headers))


@router.post("/v1/images/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> Response:
    job = await _jobs(request).cancel(job_id, _key(request))
    return JSONResponse(job.public())


@router.get("/v1/images/jobs/{job_id}/events")
async def job_events(request: Request, job_id: str) -> Response:
    jobs = _jobs(request)
    key = _key(request)
    await jobs.get(job_id, key)  # 404 before the stream starts

    async def frames() -> AsyncIterator[bytes]:
        async for job in jobs.events(job_id, key, keepalive_seconds=_KEEPALIVE_SECONDS):
            if job is None:
                yield b": keepalive\n\n"
            else:
                yield _frame(job.status, job.public())

    return StreamingResponse(
        frames(), media_type="text/event-stream", headers={"cache-control": "no-cache", "x-accel-buffering": "no"}
    )


def _frame(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
