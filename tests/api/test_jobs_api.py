"""The job endpoints' edges over HTTP (in-process, sandbox models): hostile ids and query values,
`Prefer` parsing, dry runs stay synchronous, the `webhook_url` type, cancel twice, and
Idempotency-Key on submit (the same request -> the same job; another request -> 409)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from tests.conftest import gateway_settings

from imagegate.app import create_app

BODY = {"model": "sandbox-image", "prompt": "a square", "size": "64x64"}
ASYNC = {"prefer": "respond-async"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(gateway_settings(tmp_path, jobs={"poll_seconds": 0.05}))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c


def error_of(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["param"] == param
    return error


async def wait_done(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        job: dict[str, Any] = (await client.get(f"/v1/images/jobs/{job_id}")).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("job_id", ["imgjob_nope", "x" * 500, "imgjob_%00", "..%2F..%2Fetc"])
async def test_unknown_job_is_404_everywhere(client: httpx.AsyncClient, job_id: str) -> None:
    for method, path in (("GET", ""), ("GET", "/events"), ("POST", "/cancel")):
        response = await client.request(method, f"/v1/images/jobs/{job_id}{path}")
        if response.status_code == 404 and "error" in response.json():
            assert response.json()["error"]["code"] == "not_found"
        else:
            pytest.fail(f"{method} {path}: {response.status_code} {response.text[:200]}")


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=abc", "limit=-1", "limit=1e3"])
async def test_bad_limit(client: httpx.AsyncClient, query: str) -> None:
    error = error_of(await client.get(f"/v1/images/jobs?{query}"), 400, "limit")
    assert error["type"] == "invalid_request_error"


async def test_bad_status_filter(client: httpx.AsyncClient) -> None:
    error = error_of(await client.get("/v1/images/jobs?status=running"), 400, "status")
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("prefer", ["respond-async", "RESPOND-ASYNC", "wait=10, respond-async", "respond-async; x=1"])
async def test_prefer_forms(client: httpx.AsyncClient, prefer: str) -> None:
    response = await client.post("/v1/images/generations", json=BODY, headers={"prefer": prefer})
    assert response.status_code == 202 and response.json()["status"] == "queued"


@pytest.mark.parametrize("prefer", ["wait=5", "respond-asynchronously", ""])
async def test_other_prefer_values_stay_synchronous(client: httpx.AsyncClient, prefer: str) -> None:
    response = await client.post("/v1/images/generations", json=BODY, headers={"prefer": prefer})
    assert response.status_code == 200 and response.json()["data"]


async def test_dry_run_is_never_a_job(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/images/generations?dry_run=1", json=BODY, headers=ASYNC)
    assert response.status_code == 200 and response.json()["object"] == "imagegate.dry_run"
    assert (await client.get("/v1/images/jobs")).json()["data"] == []


@pytest.mark.parametrize("value", [42, ["http://example.com"], {"url": "x"}, True])
async def test_webhook_url_must_be_a_string(client: httpx.AsyncClient, value: Any) -> None:
    response = await client.post("/v1/images/generations", json={**BODY, "webhook_url": value}, headers=ASYNC)
    assert error_of(response, 400, "webhook_url")["type"] == "invalid_request_error"
    assert (await client.get("/v1/images/jobs")).json()["data"] == []  # no job was made


async def test_cancel_a_finished_job_changes_nothing(client: httpx.AsyncClient) -> None:
    job_id = (await client.post("/v1/images/generations", json=BODY, headers=ASYNC)).json()["id"]
    assert (await wait_done(client, job_id))["status"] == "succeeded"
    response = await client.post(f"/v1/images/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "succeeded"


async def test_idempotency_key_on_submit(client: httpx.AsyncClient) -> None:
    headers = {**ASYNC, "idempotency-key": "order-1234"}
    first = await client.post("/v1/images/generations", json=BODY, headers=headers)
    again = await client.post("/v1/images/generations", json=BODY, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = await client.post("/v1/images/generations", json={**BODY, "prompt": "another"}, headers=headers)
    assert error_of(other, 409, "Idempotency-Key")["code"] == "idempotency_key_reused"
    error_of(await client.post("/v1/images/generations", json=BODY, headers={**ASYNC, "idempotency-key": "x" * 300}),
             400, "Idempotency-Key")
    listed = (await client.get("/v1/images/jobs")).json()["data"]
    assert [job["id"] for job in listed] == [first.json()["id"]]
