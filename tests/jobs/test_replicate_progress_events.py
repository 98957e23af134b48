"""An async job on a Replicate route shows the prediction's status and the tail of its logs in its
`in_progress` events (as fal's queue position and logs), redacted and capped; the final event
carries no progress. Against the fake Replicate on 127.0.0.1, through an in-process gateway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
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
)

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
