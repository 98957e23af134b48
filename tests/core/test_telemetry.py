"""core.telemetry: what a request records, and nothing outside a request."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from imagegate.core import telemetry
from imagegate.core.errors import RateLimited, UpstreamTimeout
from imagegate.core.telemetry import RequestTelemetry, UpstreamCall


def test_outside_a_request_nothing_is_recorded() -> None:
    assert telemetry.current() is None
    telemetry.note_request(model="m", operation="edit", prompt="p")
    telemetry.note_retry("fal")
    with telemetry.upstream_call("fal"), telemetry.postprocess("transform"):
        pass
    assert telemetry.current() is None


def test_upstream_seconds_counts_overlapping_calls_once() -> None:
    record = RequestTelemetry(
        upstream=[
            UpstreamCall("fal", "success", 0.0, 2.0),
            UpstreamCall("fal", "success", 1.0, 3.0),  # overlaps the first
            UpstreamCall("fal", "success", 1.5, 2.5),  # inside both
            UpstreamCall("fal", "success", 5.0, 6.0),
        ]
    )
    assert record.upstream_seconds() == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (None, "success"),
        (asyncio.CancelledError(), "cancelled"),
        (UpstreamTimeout("slow"), "upstream_timeout"),
        (RateLimited("busy"), "rate_limit_exceeded"),
        (RuntimeError("defect"), "error"),
    ],
)
def test_outcomes_are_a_bounded_set(exc: BaseException | None, outcome: str) -> None:
    assert telemetry.outcome_of(exc) == outcome


def test_instance_codes_do_not_become_labels() -> None:
    error = UpstreamTimeout("slow", code="some-upstream-string-123")
    assert telemetry.outcome_of(error) == "upstream_timeout"


async def test_tasks_and_threads_record_into_the_request() -> None:
    record, token = telemetry.begin({"request_id": "req_1"})
    try:

        async def call() -> None:
            with telemetry.upstream_call("sandbox"):
                await asyncio.sleep(0)

        await asyncio.gather(*(asyncio.create_task(call()) for _ in range(3)))
        with pytest.raises(RateLimited), telemetry.upstream_call("fal"):
            raise RateLimited("busy")

        def work() -> None:
            with telemetry.postprocess("transform"):
                pass

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, contextvars.copy_context().run, work)
    finally:
        telemetry.end(token)
    assert [c.outcome for c in record.upstream] == ["success"] * 3 + ["rate_limit_exceeded"]
    assert [s.op for s in record.steps] == ["transform"]
    assert telemetry.current() is None
