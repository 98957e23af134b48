"""Replicate predictions -> an async job's `progress`: the status and the tail of the `logs` text,
bounded, redacted, hostile shapes ignored; reports only while running and only when changed."""

from __future__ import annotations

import time
from typing import Any

import httpx

from imagegate.providers.progress import MAX_LOG_CHARS, MAX_LOG_LINES, log_tail
from imagegate.providers.replicate.prediction import Prediction
from imagegate.providers.replicate.transport import ReplicateTransport, status_progress


def test_status_and_the_last_lines() -> None:
    logs = "".join(f"step {i}\n" for i in range(8)) + "\n  \n"
    report = status_progress(Prediction({"id": "p", "status": "processing", "logs": logs}))
    assert report == {"status": "processing", "queue_position": None,
                      "logs": ["step 3", "step 4", "step 5", "step 6", "step 7"]}
    assert status_progress(Prediction({"id": "p", "status": "starting", "logs": ""}))["logs"] == []


def test_hostile_shapes_are_dropped() -> None:
    for logs in (None, 12, ["a"], {"x": "y"}):
        assert status_progress(Prediction({"id": "p", "status": "processing", "logs": logs}))["logs"] == []
    assert status_progress(Prediction({"id": "p", "status": "<b>x</b>", "logs": ""}))["status"] is None


def test_logs_are_capped_redacted_and_read_from_the_end_only() -> None:
    secret = "r8_" + "c" * 36
    huge = "x" * 5_000_000 + "\n" + "y" * 1_000 + f"\nloaded with token {secret}\n"
    report = status_progress(Prediction({"id": "p", "status": "processing", "logs": huge}))
    assert len(report["logs"]) == 2 and all(len(line) <= MAX_LOG_CHARS for line in report["logs"])
    assert secret not in str(report) and report["logs"][-1].startswith("loaded with token")
    cut = log_tail("a" * 100 + "b" * 10_000 + "\nlast\n")  # the tail starts inside the long line
    assert cut == ["last"]
    assert len(log_tail("\n".join(str(i) for i in range(100)))) == MAX_LOG_LINES


async def test_wait_reports_running_states_once_each() -> None:
    polls = iter([("starting", ""), ("processing", "a\n"), ("processing", "a\n"), ("processing", "a\nb\n"),
                  ("succeeded", "a\nb\nc\n")])

    def handler(request: httpx.Request) -> httpx.Response:
        status, logs = next(polls)
        output = ["https://replicate.delivery/x/out.png"] if status == "succeeded" else None
        return httpx.Response(200, json={"id": "p", "status": status, "logs": logs, "output": output})

    seen: list[dict[str, Any]] = []

    async def record(info: dict[str, Any]) -> None:
        seen.append(info)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        transport = ReplicateTransport(
            http, token="r8_token-123456", base_url="https://api.replicate.com/v1", poll_interval=0.001,
            poll_max_interval=0.001,
        )
        resumed = Prediction({"id": "p", "urls": {}})  # a resumed prediction: nothing known before the first poll
        done = await transport.wait(resumed, deadline=time.monotonic() + 10, on_progress=record)
    assert done.status == "succeeded"
    assert [(s["status"], s["logs"]) for s in seen] == [
        ("starting", []), ("processing", ["a"]), ("processing", ["a", "b"])
    ]
