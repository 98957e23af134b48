"""An async job on a Replicate route shows the prediction's status and the tail of its logs in its
`in_progress` events (as fal's queue position and logs), redacted and capped; the final event
carries no progress. Against the fake Replicate on 127.0.0.1, through an in-process gateway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from tests.conftest import gateway_settings
from tests.fakes.fal import FakeFal
from tests.fakes.replicate import FakeReplicate, ReplicateScenario
from tests.fakes.server import LocalServer
from tests.jobs.test_outage_drain import (
    fal_server,
    make_app,
    read_events,
    replicate,
    replicate_server,
    submit,
    wait_done,
)

from imagegate.app import create_app
from imagegate.providers.progress import MAX_LOG_CHARS, MAX_LOG_LINES

__all__ = ["fal_server", "replicate", "replicate_server"]


async def test_events_show_replicate_status_and_logs(
    tmp_path: Path, fal_server: tuple[FakeFal, LocalServer], replicate_server: tuple[FakeReplicate, LocalServer],
    replicate: FakeReplicate,
) -> None:
    planted = "sk-" + "d" * 40  # a secret-looking token a model printed
    lines = [f"step {i}/8" for i in range(8)] + ["w" * 1000, "using token r8_test-token and " + planted]
    # ~8 polls starting, ~25 processing at 0.02-0.05 s (the create answers at once): the events (every
    # 0.25 s) see both states
    replicate.scenario = ReplicateScenario(
        starting_ticks=8, processing_ticks=25, wait_ticks=0, logs="\n".join(lines) + "\n"
    )
    app = make_app(tmp_path, fal_server[1], None, replicate_server[1])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30) as client:
            events = await read_events(client, await submit(client, "rep"))
    assert events[-1][0] == "succeeded" and "progress" not in events[-1][1]
    assert events[-1][1]["provider"] == "replicate" and events[-1][1]["upstream_request_id"] == replicate.last_create.id
    reports: list[dict[str, Any]] = [
        data["progress"] for name, data in events if name == "in_progress" and "progress" in data
    ]
    statuses = [report["status"] for report in reports]
    assert "starting" in statuses and "processing" in statuses, reports
    assert statuses.index("starting") < statuses.index("processing")
    assert all(report["queue_position"] is None for report in reports)
    running = [report for report in reports if report["status"] == "processing"]
    last_logs = running[-1]["logs"]
    assert len(last_logs) == MAX_LOG_LINES and last_logs[:3] == ["step 5/8", "step 6/8", "step 7/8"]
    assert len(last_logs[3]) <= MAX_LOG_CHARS and last_logs[3].startswith("www")
    assert last_logs[4].startswith("using token")
    text = json.dumps(events)
    assert planted not in text and "r8_test-token" not in text
    assert len(replicate.creates) == 1


async def test_a_job_polls_a_quick_prediction_soon(
    tmp_path: Path, replicate_server: tuple[FakeReplicate, LocalServer], replicate: FakeReplicate
) -> None:
    """With the default cadence (`poll_interval` 0.5 s) a job still polls from
    `job_poll_interval` (0.1 s): the job holds its provider slot until it sees the outcome."""
    replicate.scenario = ReplicateScenario(starting_ticks=1, processing_ticks=2, wait_ticks=0)  # done on poll 3
    srv = replicate_server[1]
    settings = gateway_settings(
        tmp_path,
        providers={"replicate": {"api_token": "r8_test-token", "base_url": srv.url + "/v1"}},
        models={"rep": {"routes": [{"provider": "replicate", "model": "qwen/qwen-image"}]}},
        jobs={"poll_seconds": 0.05},
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30) as client:
            job = await wait_done(client, await submit(client, "rep"))
    assert job["status"] == "succeeded", job
    created = next(rec.at for rec in replicate.requests if rec.method == "POST")
    polls = [rec.at for rec in replicate.requests if rec.method == "GET" and "/predictions/" in rec.path]
    assert len(polls) == 3 and polls[-1] - created < 1.2, [round(at - created, 3) for at in polls]
