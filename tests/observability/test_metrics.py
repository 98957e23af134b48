"""GET /metrics: values move by exactly what known requests did (in-process app, real fake fal)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tests.conftest import gateway_settings
from tests.fakes.fal import FakeFal, FalScenario, fal_provider_settings, rate_limited
from tests.fakes.images import png_bytes
from tests.fakes.server import LocalServer
from tests.observability.promtext import Samples, delta, parse, value

from imagegate.app import create_app
from imagegate.observability.middleware import parse_params

FAL_MODEL = "fal-ai/qwen-image-edit-2511"


@pytest.fixture(scope="module")
def fal() -> Iterator[tuple[FakeFal, LocalServer]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv


def settings_for(tmp_path: Path, fal_url: str) -> Any:
    return gateway_settings(
        tmp_path,
        routing={"backoff_base": 0.01, "backoff_max": 0.02, "deadline_seconds": 20},
        models={
            "fal-edit": {"routes": [{"provider": "fal", "model": FAL_MODEL}]},
            "fal-then-replicate": {
                "routes": [
                    {"provider": "fal", "model": FAL_MODEL},
                    {"provider": "replicate", "model": "qwen/qwen-image-edit-2511"},
                ]
            },
        },
        providers={"fal": fal_provider_settings(fal_url)},
    )


class KeyAndCost:
    """Stands in for the access layer: names the key and prices successful image responses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["key_name"] = "team-a"

        async def priced(message: Message) -> None:
            start = message["type"] == "http.response.start"
            if start and message["status"] == 200 and scope["path"].startswith("/v1/images/"):
                MutableHeaders(scope=message)["x-imagegate-cost-usd"] = "0.0300"
            await send(message)

        await self.app(scope, receive, priced)


@pytest.fixture
async def app(tmp_path: Path, fal: tuple[FakeFal, LocalServer]) -> AsyncIterator[FastAPI]:
    fake, srv = fal
    fake.reset()
    fake.scenario = FalScenario.instant()
    application = create_app(settings_for(tmp_path, srv.url))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
        yield c


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


async def edit(client: httpx.AsyncClient, model: str, **data: str) -> httpx.Response:
    return await client.post(
        "/v1/images/edits",
        data={"model": model, "prompt": "grayscale", **data},
        files={"image": ("a.png", png_bytes(40, 30), "image/png")},
    )


async def test_every_issue_metric_is_exposed(client: httpx.AsyncClient) -> None:
    text = (await client.get("/metrics")).text
    for name in (
        "imagegate_requests_total",
        "imagegate_request_duration_seconds",
        "imagegate_upstream_requests_total",
        "imagegate_upstream_duration_seconds",
        "imagegate_retries_total",
        "imagegate_fallbacks_total",
        "imagegate_in_flight_requests",
        "imagegate_emulations_total",
        "imagegate_images_total",
        "imagegate_cost_usd_total",
        "imagegate_postprocess_seconds",
    ):
        assert f"# TYPE {name} " in text, name


async def test_sandbox_requests_move_the_counters_by_what_they_did(client: httpx.AsyncClient) -> None:
    before = await scrape(client)
    for _ in range(2):
        response = await edit(client, "sandbox-edit", n="2", size="64x48", response_format="b64_json")
        assert response.status_code == 200 and len(response.json()["data"]) == 2
    url_response = await edit(client, "sandbox-edit", response_format="url")
    assert url_response.status_code == 200
    bad = await edit(client, "sandbox-edit", n="0")
    assert bad.status_code == 400
    after = await scrape(client)
    ok = {"endpoint": "/v1/images/edits", "model": "sandbox-edit", "key": "anonymous"}
    assert delta(before, after, "imagegate_requests_total", status="200", **ok) == 3
    assert delta(before, after, "imagegate_requests_total", status="400", **{**ok, "model": "-"}) == 1
    assert delta(before, after, "imagegate_images_total", model="sandbox-edit", provider="sandbox") == 5
    assert delta(before, after, "imagegate_request_duration_seconds_count", endpoint="/v1/images/edits",
                 model="sandbox-edit") == 3
    upstream = delta(before, after, "imagegate_upstream_requests_total", provider="sandbox", outcome="success")
    assert upstream == delta(before, after, "imagegate_upstream_duration_seconds_count", provider="sandbox") >= 3
    assert delta(before, after, "imagegate_postprocess_seconds_count", op="base64") == 4
    assert delta(before, after, "imagegate_postprocess_seconds_count", op="store") == 1
    assert value(after, "imagegate_in_flight_requests") == 1  # the scrape itself
    params = parse_params(response.headers["x-imagegate-params"])
    emulated = {p: m for p, m in params.items() if m != "passthrough"}
    assert emulated  # the sandbox's table converts or emulates something for this request
    for param, mode in emulated.items():
        assert delta(before, after, "imagegate_emulations_total", param=param, mode=mode) >= 2
    assert delta(before, after, "imagegate_cost_usd_total", key="anonymous", model="sandbox-edit") == 0


async def test_key_name_and_cost_come_from_the_access_layer(app: FastAPI, client: httpx.AsyncClient) -> None:
    app.user_middleware.append(Middleware(KeyAndCost))  # innermost: it runs where the auth layer would
    app.middleware_stack = app.build_middleware_stack()
    before = await scrape(client)
    for _ in range(3):
        assert (await edit(client, "sandbox-edit", response_format="b64_json")).status_code == 200
    after = await scrape(client)
    labels = {"endpoint": "/v1/images/edits", "model": "sandbox-edit", "status": "200"}
    assert delta(before, after, "imagegate_requests_total", key="team-a", **labels) == 3
    assert delta(before, after, "imagegate_requests_total", key="anonymous", **labels) == 0
    assert delta(before, after, "imagegate_cost_usd_total", key="team-a", model="sandbox-edit") == pytest.approx(0.09)


async def test_retries_upstream_outcomes_and_fallbacks(
    client: httpx.AsyncClient, fal: tuple[FakeFal, LocalServer]
) -> None:
    fake, _ = fal
    fake.scenario = FalScenario.instant(submit_errors=[rate_limited(retry_after=0)])
    before = await scrape(client)
    response = await edit(client, "fal-edit", response_format="b64_json")
    assert response.status_code == 200, response.text
    after = await scrape(client)
    assert delta(before, after, "imagegate_retries_total", provider="fal") == 1
    assert delta(before, after, "imagegate_upstream_requests_total", provider="fal",
                 outcome="rate_limit_exceeded") == 1
    assert delta(before, after, "imagegate_upstream_requests_total", provider="fal", outcome="success") == 1
    assert delta(before, after, "imagegate_images_total", model="fal-edit", provider="fal") == 1

    fake.scenario = FalScenario.instant(always_fail_submit=rate_limited(retry_after=0))
    before = after
    failed = await edit(client, "fal-then-replicate")
    assert failed.status_code == 429  # replicate, the fallback, has no token: fal's failure is the answer
    after = await scrape(client)
    assert delta(before, after, "imagegate_fallbacks_total", model="fal-then-replicate") == 1
    assert delta(before, after, "imagegate_retries_total", provider="fal") == 2  # max_attempts 3
    assert delta(before, after, "imagegate_requests_total", endpoint="/v1/images/edits",
                 model="fal-then-replicate", status="429", key="anonymous") == 1
    assert delta(before, after, "imagegate_images_total", model="fal-then-replicate", provider="fal") == 0


async def test_unknown_paths_and_file_ids_do_not_create_label_values(client: httpx.AsyncClient) -> None:
    for path in ("/nope/1", "/nope/2", "/v1/files/images/" + "a" * 32 + ".png"):
        await client.get(path)
    samples = await scrape(client)
    endpoints = {dict(labels).get("endpoint") for (name, labels) in samples if name == "imagegate_requests_total"}
    assert "other" in endpoints and "/v1/files/images/{image_id}" in endpoints
    assert not any(e and ("nope" in e or "aaaa" in e) for e in endpoints)


async def test_unknown_request_fields_do_not_create_label_values(client: httpx.AsyncClient) -> None:
    """The sandbox ignores fields it does not model and reports them in `x-imagegate-params`;
    a client inventing field names must not mint a time series per name."""
    for i in range(3):
        response = await client.post(
            "/v1/images/generations",
            json={"model": "sandbox-image", "prompt": "x", "size": "64x64", f"made_up_{i}": 1},
        )
        assert response.status_code == 200
        assert f"made_up_{i}=ignored" in response.headers["x-imagegate-params"]
    samples = await scrape(client)
    params = {dict(labels)["param"] for (name, labels) in samples if name == "imagegate_emulations_total"}
    assert "size" in params
    assert not any(p.startswith("made_up_") for p in params)
    assert value(samples, "imagegate_emulations_total", param="other", mode="ignored") == 3


async def test_a_request_the_app_left_unanswered_counts_as_499_not_500() -> None:
    """A stream whose client goes away before the first byte returns without answering: that is the
    client's doing (499), not a server error that would page someone."""
    from imagegate.observability.metrics import Metrics
    from imagegate.observability.middleware import InFlight, ObservabilityMiddleware

    async def gone(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent")

    metrics = Metrics()
    middleware = ObservabilityMiddleware(gone, metrics=metrics, inflight=InFlight())
    await middleware({"type": "http", "method": "POST", "path": "/v1/images/edits", "headers": []}, receive, send)
    samples = parse(metrics.render().decode())
    statuses = {dict(labels)["status"] for (name, labels) in samples if name == "imagegate_requests_total"}
    assert statuses == {"499"}


async def test_real_keys_prices_and_replays(tmp_path: Path, fal: tuple[FakeFal, LocalServer]) -> None:
    """With the access layer configured: the key's name labels the requests, the route's price the
    cost, and an idempotent replay (no upstream work) adds no cost and no images."""
    _, srv = fal
    settings = settings_for(tmp_path, srv.url)
    sandbox = settings.models["sandbox-edit"].model_dump()
    sandbox["routes"][0]["price"] = {"per_image": 0.03}
    settings = gateway_settings(
        tmp_path,
        auth={"keys": [{"name": "team-a", "key": "team-a-key-0123456789abcdef"}]},
        models={"sandbox-edit": sandbox},
    )
    application = create_app(settings)
    headers = {"authorization": "Bearer team-a-key-0123456789abcdef"}
    transport = httpx.ASGITransport(app=application)
    async with application.router.lifespan_context(application), httpx.AsyncClient(
        transport=transport, base_url="http://gateway", headers=headers
    ) as client:
        before = await scrape(client)
        for _ in range(3):
            response = await edit(client, "sandbox-edit", n="2", response_format="b64_json")
            assert response.status_code == 200 and response.headers["x-imagegate-cost-usd"]
        first = await client.post(
            "/v1/images/edits",
            data={"model": "sandbox-edit", "prompt": "invert", "response_format": "b64_json"},
            files={"image": ("a.png", png_bytes(20, 20), "image/png")},
            headers={"idempotency-key": "metrics-replay-1"},
        )
        replay = await client.post(
            "/v1/images/edits",
            data={"model": "sandbox-edit", "prompt": "invert", "response_format": "b64_json"},
            files={"image": ("a.png", png_bytes(20, 20), "image/png")},
            headers={"idempotency-key": "metrics-replay-1"},
        )
        assert first.status_code == replay.status_code == 200
        assert replay.headers.get("idempotent-replayed") == "true"
        denied = await client.post("/v1/images/edits", headers={"authorization": "Bearer nope-nope-nope"})
        assert denied.status_code == 401
        after = await scrape(client)
    labels = {"endpoint": "/v1/images/edits", "model": "sandbox-edit", "status": "200"}
    assert delta(before, after, "imagegate_requests_total", key="team-a", **labels) == 4
    replays = {"endpoint": "/v1/images/edits", "model": "-", "status": "200"}  # never reached the service
    assert delta(before, after, "imagegate_requests_total", key="team-a", **replays) == 1
    assert delta(before, after, "imagegate_cost_usd_total", key="team-a", model="sandbox-edit") == pytest.approx(
        3 * 2 * 0.03 + 0.03
    )
    assert delta(before, after, "imagegate_images_total", model="sandbox-edit", provider="sandbox") == 7
    assert delta(before, after, "imagegate_requests_total", endpoint="/v1/images/edits", model="-",
                 status="401", key="anonymous") == 1
