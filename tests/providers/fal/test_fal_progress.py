"""fal status payloads -> an async job's `progress`: bounded, redacted, hostile shapes ignored."""

from __future__ import annotations

from typing import Any

from imagegate.providers.fal.progress import MAX_LOG_CHARS, ProgressReporter, status_progress


def test_queue_position_only_while_in_queue() -> None:
    assert status_progress({"status": "IN_QUEUE", "queue_position": 3, "logs": None}) == {
        "status": "IN_QUEUE", "queue_position": 3, "logs": []
    }
    assert status_progress({"status": "IN_PROGRESS", "queue_position": 3})["queue_position"] is None


def test_hostile_shapes_are_dropped() -> None:
    for position in (True, -1, "2", 2.5, None):
        assert status_progress({"status": "IN_QUEUE", "queue_position": position})["queue_position"] is None
    body: dict[str, Any] = {"status": {"x": 1}, "logs": [1, "a", {"message": ["x"]}, {"message": "ok"}]}
    assert status_progress(body) == {"status": None, "queue_position": None, "logs": ["ok"]}
    assert status_progress({"status": "IN_PROGRESS", "logs": {"message": "x"}})["logs"] == []


def test_logs_are_the_last_five_capped_and_redacted() -> None:
    secret = "sk-" + "b" * 40
    logs = [{"message": "x" * 10_000}] * 10 + [{"message": f"token {secret}"}]
    report = status_progress({"status": "IN_PROGRESS", "logs": logs})
    assert len(report["logs"]) == 5
    assert all(len(line) <= MAX_LOG_CHARS + 3 for line in report["logs"])
    assert secret not in str(report) and "token" in report["logs"][-1]


async def test_reporter_forwards_changes_only_and_not_completion() -> None:
    seen: list[dict[str, Any]] = []

    async def record(info: dict[str, Any]) -> None:
        seen.append(info)

    report = ProgressReporter(record)
    for body in ({"status": "IN_QUEUE", "queue_position": 2}, {"status": "IN_QUEUE", "queue_position": 2},
                 {"status": "IN_QUEUE", "queue_position": 1}, {"status": "COMPLETED"}):
        await report(body)
    assert [s["queue_position"] for s in seen] == [2, 1]
