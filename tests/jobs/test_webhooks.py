"""Job webhooks: a receiver on 127.0.0.1 verifies every delivery with the `standardwebhooks`
package; one that fails twice then succeeds gets the same webhook-id three times, and every
attempt shows on the job. A URL the SSRF guard refuses is a 400 naming `webhook_url` at once."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from tests.conftest import gateway_settings
from tests.fakes.server import LocalServer
from tests.redis_support import redis_prefix, redis_url

from imagegate.app import create_app

__all__ = ["redis_prefix", "redis_url"]

SECRET = "whsec_" + base64.b64encode(b"imagegate-test-webhook-secret-32b").decode()
ASYNC = {"Prefer": "respond-async"}


class Receiver:
    def __init__(self) -> None:
        self.fail_first = 0
        self.deliveries: list[dict[str, Any]] = []  # every POST: headers, verified payload
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items()}
        payload = Webhook(SECRET).verify(body, headers)  # raises on a bad signature
        self.deliveries.append({"headers": headers, "payload": payload})
        if len(self.deliveries) <= self.fail_first:
            return Response("not now", status_code=500)
        return Response(status_code=204)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, LocalServer]]:
    hook = Receiver()
    with LocalServer(hook.app) as srv:
        yield hook, srv


@pytest.fixture(params=["sqlite", "redis"])
async def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FastAPI]:
    """The gateway on each job engine: embedded SQLite, and Redis (`redis.url` set)."""
    redis = {}
    if request.param == "redis":
        redis = {"redis": {"url": request.getfixturevalue("redis_url"),
                           "key_prefix": request.getfixturevalue("redis_prefix")}}
    settings = gateway_settings(
        tmp_path,
        webhooks={"secret": SECRET, "backoff_base": 0.05, "backoff_max": 0.1, "max_attempts": 5},
        fetch={"allow_hosts": ["127.0.0.1"]},
        providers={"sandbox": {"delay_seconds": 0.2}},
        jobs={"poll_seconds": 0.05},
        **redis,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


def sdk_for(app: FastAPI) -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway")
    return openai.AsyncOpenAI(api_key="unused", base_url="http://gateway/v1", http_client=http, max_retries=0)


async def until(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_fails_twice_then_succeeds_same_webhook_id(
    gateway: FastAPI, receiver: tuple[Receiver, LocalServer]
) -> None:
    hook, srv = receiver
    hook.fail_first = 2
    async with sdk_for(gateway) as sdk:
        raw = await sdk.images.with_raw_response.generate(
            model="sandbox-image", prompt="x", size="64x64", response_format="b64_json",
            extra_body={"webhook_url": srv.url + "/hook"}, extra_headers=ASYNC,
        )
        job_id = raw.http_response.json()["id"]
        await until(lambda: len(hook.deliveries) >= 3)
        await asyncio.sleep(0.3)
        assert len(hook.deliveries) == 3  # delivered: no more attempts
        ids = {d["headers"]["webhook-id"] for d in hook.deliveries}
        assert ids == {f"msg_{job_id}"}
        payload = hook.deliveries[-1]["payload"]
        assert payload["type"] == "image.job.succeeded" and payload["data"]["id"] == job_id
        assert payload["data"]["status"] == "succeeded" and payload["data"]["result"]["data"][0]["b64_json"]
        job: dict[str, Any] = await sdk.get(f"/images/jobs/{job_id}", cast_to=object)
        webhook = job["webhook"]
        assert webhook["status"] == "delivered" and webhook["id"] == f"msg_{job_id}"
        assert [a.get("status") for a in webhook["attempts"]] == [500, 500, 204]
        await asyncio.sleep(0.6)  # the job gauges are refreshed by the housekeeping loop
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gateway") as plain:
            metrics = (await plain.get("/metrics")).text
        for line in (
            'imagegate_webhook_deliveries_total{outcome="http_5xx"} 2.0',
            'imagegate_webhook_deliveries_total{outcome="success"} 1.0',
            'imagegate_jobs{status="succeeded"} 1.0',
            'imagegate_jobs{status="queued"} 0.0',
            "imagegate_job_queue_seconds_count 1.0",
            "imagegate_job_duration_seconds_count 1.0",
        ):
            assert line in metrics.splitlines(), line


async def test_canceled_event(gateway: FastAPI, receiver: tuple[Receiver, LocalServer]) -> None:
    hook, srv = receiver
    async with sdk_for(gateway) as sdk:
        ids = []
        for _ in range(6):  # the last ones wait behind the 4 workers
            raw = await sdk.images.with_raw_response.generate(
                model="sandbox-image", prompt="x", extra_body={"webhook_url": srv.url + "/hook"}, extra_headers=ASYNC
            )
            ids.append(raw.http_response.json()["id"])
        await sdk.post(f"/images/jobs/{ids[-1]}/cancel", cast_to=object)
        await until(lambda: len(hook.deliveries) >= 6)
        types = {d["payload"]["data"]["id"]: d["payload"]["type"] for d in hook.deliveries}
        assert types[ids[-1]] == "image.job.canceled"
        assert all(types[i] == "image.job.succeeded" for i in ids[:-1])


@pytest.mark.parametrize("url", ["http://10.0.0.1/hook", "http://169.254.169.254/latest", "ftp://example.com/x"])
async def test_refused_url_is_400_at_once(gateway: FastAPI, url: str) -> None:
    async with sdk_for(gateway) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.images.generate(
                model="sandbox-image", prompt="x", extra_body={"webhook_url": url}, extra_headers=ASYNC
            )
        assert caught.value.body["param"] == "webhook_url"  # type: ignore[index]
        listed: dict[str, Any] = await sdk.get("/images/jobs", cast_to=object)
        assert listed["data"] == []


async def test_no_secret_no_webhooks(tmp_path: Path) -> None:
    app = create_app(gateway_settings(tmp_path, fetch={"allow_hosts": ["127.0.0.1"]}))
    async with app.router.lifespan_context(app), sdk_for(app) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.images.generate(
                model="sandbox-image", prompt="x", extra_body={"webhook_url": "http://127.0.0.1:9/h"},
                extra_headers=ASYNC,
            )
        assert caught.value.body["param"] == "webhook_url"  # type: ignore[index]
    with pytest.raises(ValueError, match=r"webhooks\.secret"):
        create_app(gateway_settings(tmp_path, auth={"keys": [{"name": "a", "key": "k" * 8, "webhook_url": "http://x/"}]}))


async def test_key_default_webhook_url(tmp_path: Path, receiver: tuple[Receiver, LocalServer]) -> None:
    hook, srv = receiver
    key = {"name": "team-a", "key": "key-a-secret", "webhook_url": srv.url + "/hook"}
    settings = gateway_settings(
        tmp_path, auth={"keys": [key]}, webhooks={"secret": SECRET}, fetch={"allow_hosts": ["127.0.0.1"]},
        jobs={"poll_seconds": 0.05},
    )
    app = create_app(settings)
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway")
    async with app.router.lifespan_context(app), openai.AsyncOpenAI(
        api_key="key-a-secret", base_url="http://gateway/v1", http_client=http, max_retries=0
    ) as sdk:
        raw = await sdk.images.with_raw_response.generate(model="sandbox-image", prompt="x", extra_headers=ASYNC)
        await until(lambda: len(hook.deliveries) >= 1)
        assert hook.deliveries[0]["payload"]["data"]["id"] == raw.http_response.json()["id"]
