"""Async image jobs through the official openai SDK (in-process gateway, sandbox models):
`Prefer: respond-async` -> 202 + Location, poll to succeeded, the result decodes to the size and
format asked for; a bad request is still a 400 at once; cancel; the event stream's order; jobs
belong to their key."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI
from PIL import Image
from tests.conftest import gateway_settings
from tests.fakes.images import png_bytes

from imagegate.app import create_app

ASYNC = {"Prefer": "respond-async"}
KEYS = [{"name": "team-a", "key": "key-a-secret"}, {"name": "team-b", "key": "key-b-secret"}]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[FastAPI]:
    settings = gateway_settings(
        tmp_path,
        auth={"keys": KEYS},
        providers={"sandbox": {"delay_seconds": 0.3}},
        jobs={"poll_seconds": 0.05},
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


def sdk_for(app: FastAPI, key: str) -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway")
    return openai.AsyncOpenAI(api_key=key, base_url="http://gateway/v1", http_client=http, max_retries=0)


async def wait_for(sdk: openai.AsyncOpenAI, job_id: str, *statuses: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = await sdk.get(f"/images/jobs/{job_id}", cast_to=object)
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)


async def test_generate_async_then_poll(gateway: FastAPI) -> None:
    async with sdk_for(gateway, "key-a-secret") as sdk:
        raw = await sdk.images.with_raw_response.generate(
            model="sandbox-image", prompt="a red square", size="96x64", output_format="webp",
            response_format="b64_json", extra_headers=ASYNC,
        )
        assert raw.http_response.status_code == 202
        body = raw.http_response.json()
        assert body["object"] == "image.job" and body["status"] == "queued" and body["model"] == "sandbox-image"
        assert body["id"].startswith("imgjob_") and isinstance(body["created_at"], int)
        assert raw.headers["location"] == f"/v1/images/jobs/{body['id']}"

        job = await wait_for(sdk, body["id"], "succeeded", "failed")
        assert job["status"] == "succeeded", job
        assert job["provider"] == "sandbox" and job["attempts"] == 1 and job["error"] is None
        assert job["started_at"] >= job["created_at"] and job["finished_at"] >= job["started_at"]
        image = Image.open(io.BytesIO(base64.b64decode(job["result"]["data"][0]["b64_json"])))
        assert image.size == (96, 64) and image.format == "WEBP"
        assert job["result"]["size"] == "96x64" and job["result"]["output_format"] == "webp"
        raw_job = await sdk.get(f"/images/jobs/{body['id']}", cast_to=httpx2.Response)
        assert "x-imagegate-params" in raw_job.headers and raw_job.headers["x-imagegate-provider"] == "sandbox"


async def test_edit_async_url_result_is_served(gateway: FastAPI) -> None:
    async with sdk_for(gateway, "key-a-secret") as sdk:
        raw = await sdk.images.with_raw_response.edit(
            model="sandbox-edit", image=("a.png", png_bytes(80, 40)), prompt="grayscale", extra_headers=ASYNC
        )
        assert raw.http_response.status_code == 202
        job = await wait_for(sdk, raw.http_response.json()["id"], "succeeded", "failed")
        assert job["status"] == "succeeded", job
        url = job["result"]["data"][0]["url"]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway)) as plain:
            image = Image.open(io.BytesIO((await plain.get(url)).content))
        assert image.size == (80, 40) and image.format == "PNG"


async def test_bad_request_is_400_at_once(gateway: FastAPI) -> None:
    async with sdk_for(gateway, "key-a-secret") as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.images.generate(model="sandbox-image", prompt="x", n=0, extra_headers=ASYNC)
        assert caught.value.status_code == 400 and caught.value.body["param"] == "n"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            await sdk.images.generate(model="no-such-model", prompt="x", extra_headers=ASYNC)
        listed: dict[str, Any] = await sdk.get("/images/jobs", cast_to=object)
        assert listed["data"] == []  # nothing was queued


async def test_jobs_belong_to_their_key(gateway: FastAPI) -> None:
    async with sdk_for(gateway, "key-a-secret") as a, sdk_for(gateway, "key-b-secret") as b:
        raw = await a.images.with_raw_response.generate(model="sandbox-image", prompt="x", extra_headers=ASYNC)
        job_id = raw.http_response.json()["id"]
        for path in (f"/images/jobs/{job_id}", f"/images/jobs/{job_id}/events"):
            with pytest.raises(openai.NotFoundError):
                await b.get(path, cast_to=object)
        with pytest.raises(openai.NotFoundError):
            await b.post(f"/images/jobs/{job_id}/cancel", cast_to=object)
        listed: dict[str, Any] = await b.get("/images/jobs", cast_to=object)
        assert listed["data"] == []
        await wait_for(a, job_id, "succeeded")


async def test_cancel_in_progress_and_queued(gateway: FastAPI, tmp_path: Path) -> None:
    async with sdk_for(gateway, "key-a-secret") as sdk:
        ids = []
        for _ in range(6):  # 4 workers: the last two wait in the queue
            raw = await sdk.images.with_raw_response.generate(model="sandbox-image", prompt="x", extra_headers=ASYNC)
            ids.append(raw.http_response.json()["id"])
        await wait_for(sdk, ids[0], "in_progress")
        queued: dict[str, Any] = await sdk.get(f"/images/jobs/{ids[5]}", cast_to=object)
        assert queued["status"] == "queued" and queued["queue_position"] >= 0
        canceled: dict[str, Any] = await sdk.post(f"/images/jobs/{ids[5]}/cancel", cast_to=object)
        assert canceled["status"] == "canceled" and canceled["result"] is None
        canceled = await sdk.post(f"/images/jobs/{ids[0]}/cancel", cast_to=object)
        assert canceled["status"] == "canceled"
        for job_id in ids[1:5]:
            assert (await wait_for(sdk, job_id, "succeeded", "failed", "canceled"))["status"] == "succeeded"
        only = {"params": {"status": "canceled"}}
        listed: dict[str, Any] = await sdk.get("/images/jobs", cast_to=object, options=only)  # type: ignore[arg-type]
        assert sorted(j["id"] for j in listed["data"]) == sorted([ids[0], ids[5]])
        page: dict[str, Any] = await sdk.get("/images/jobs", cast_to=object, options={"params": {"limit": 2}})
        assert [j["id"] for j in page["data"]] == [ids[5], ids[4]] and page["has_more"] is True
        rest: dict[str, Any] = await sdk.get(
            "/images/jobs", cast_to=object, options={"params": {"limit": 100, "after": page["last_id"]}}
        )
        assert [j["id"] for j in rest["data"]] == ids[3::-1] and rest["has_more"] is False
        with pytest.raises(openai.BadRequestError):
            await sdk.get("/images/jobs", cast_to=object, options={"params": {"status": "done"}})


async def test_events_stream_order(gateway: FastAPI) -> None:
    async with sdk_for(gateway, "key-a-secret") as sdk:
        raw = await sdk.images.with_raw_response.generate(model="sandbox-image", prompt="x", extra_headers=ASYNC)
        job_id = raw.http_response.json()["id"]
    transport = httpx.ASGITransport(app=gateway)
    headers = {"authorization": "Bearer key-a-secret"}
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway", headers=headers) as http:
        events = await read_events(http, f"/v1/images/jobs/{job_id}/events")
        names = [name for name, _ in events]
        assert names[-1] == "succeeded" and "in_progress" in names and names.count("succeeded") == 1
        assert names.index("in_progress") < names.index("succeeded")
        assert events[-1][1]["result"]["data"]
        late = await read_events(http, f"/v1/images/jobs/{job_id}/events")  # a late connector: the state now
        assert [name for name, _ in late] == ["succeeded"]


async def read_events(http: httpx.AsyncClient, path: str) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    async with http.stream("GET", path, timeout=20) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        name = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name is not None:
                events.append((name, json.loads(line[6:])))
    return events
