"""A fal queue job once submitted: its handle (`QueueHandle`), how its status is followed
(`StatusCadence`), and the requests that follow it to its output (`StatusFollower`, a base of
`FalTransport`): the status by polling or on the SSE stream (`stream.py`), then the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from imagegate.providers.common import get_with_retry, poll_delays
from imagegate.providers.fal.errors import TRANSIENT_STATUSES, FalFailure, map_failure
from imagegate.providers.fal.progress import ProgressReporter
from imagegate.providers.fal.stream import StatusStream, StreamMiss, stream_url
from imagegate.providers.fal.wire import json_object as _json
from imagegate.providers.fal.wire import json_or_none as _json_or_none
from imagegate.settings import FalSettings
from imagegate.upstream_response import response_header

__all__ = ["PROVIDER", "FalOutput", "FirstLook", "QueueHandle", "StatusCadence", "StatusFollower"]

log = logging.getLogger("imagegate.providers.fal")

PROVIDER = "fal"


@dataclass(slots=True)
class QueueHandle:
    """The submit response: the URLs are fal's, used exactly as returned."""

    model: str
    request_id: str
    status_url: str
    response_url: str
    cancel_url: str


@dataclass(frozen=True, slots=True)
class StatusCadence:
    """How a queue job's status is followed: the SSE stream (polling if it breaks), or polls that
    start `poll_interval` apart and grow to `poll_max_interval`."""

    stream: bool
    poll_interval: float


class FirstLook:
    """Whether to ask a queue job's status once before following its stream, learned per model.

    The look pays for a model whose jobs are often done by then: such a job ends in three plain
    requests (submit, status, result) and opens no stream. For a model whose jobs are still running,
    it is one request more per job. So the look is taken while the share of a model's jobs found
    done at once (a moving average over about the last RATE_JOBS jobs, starting at 1) is at least
    FLOOR. While it is skipped, the stream's first event tells the same: a job done when its stream
    opened sends COMPLETED first, which brings the look back for a model that became fast."""

    FLOOR = 0.1
    RATE_JOBS = 16
    MODELS = 1024  # models remembered (a full table starts again)

    __slots__ = ("rates",)

    def __init__(self) -> None:
        self.rates: dict[str, float] = {}

    def worth(self, model: str) -> bool:
        return self.rates.get(model, 1.0) >= self.FLOOR

    def saw(self, model: str, done: bool) -> None:
        """A job of `model` was (or was not) done at its first look or its stream's first event."""
        rates = self.rates
        rate = rates.get(model, 1.0)
        if len(rates) >= self.MODELS and model not in rates:
            rates.clear()
        rates[model] = rate + ((1.0 if done else 0.0) - rate) / self.RATE_JOBS


@dataclass(slots=True)
class FalOutput:
    body: Any  # the model output JSON
    request_id: str | None


class StatusFollower:
    """Status and result requests of `FalTransport` (which provides the attributes below)."""

    http: httpx.AsyncClient
    config: FalSettings
    stream: StatusStream
    first_look: FirstLook
    headers: Callable[[], dict[str, str]]

    async def wait(
        self, handle: QueueHandle, report: ProgressReporter | None = None, cadence: StatusCadence | None = None
    ) -> dict[str, Any]:
        """The COMPLETED status payload. A job is followed on the SSE stream when enabled and
        available (`stream.py`: one request instead of a poll every 0.5-3 s), else (and whenever
        the stream fails) by polling the same job. Before the stream, the status is asked once as
        soon as the submit is answered while that pays for the model (`FirstLook`): a quick job is
        done then, three plain requests in all."""
        if cadence is None:  # the configured one (not built per job)
            stream, interval = self.config.status_stream, self.config.poll_interval
        else:
            stream, interval = cadence.stream, cadence.poll_interval
        if stream and self.stream.usable:
            look, model = self.first_look, handle.model
            learn = None
            if look.worth(model):
                first = await self.status_once(handle, report)
                done = first.get("status") == "COMPLETED"
                look.saw(model, done)
                if done:
                    return first
            else:
                def learn(done: bool) -> None:
                    look.saw(model, done)
            status = await self.stream_status(handle, report, learn)
            if not isinstance(status, StreamMiss):
                return status
            if status is StreamMiss.BROKEN:
                log.info("fal status stream broke for %s; polling instead", handle.request_id)
            return await self.poll_status(handle, report, start=interval, stream_later=status is StreamMiss.BUSY)
        return await self.poll_status(handle, report, start=interval)

    async def poll_status(
        self,
        handle: QueueHandle,
        report: ProgressReporter | None = None,
        *,
        start: float | None = None,
        stream_later: bool = False,
    ) -> dict[str, Any]:
        """Poll to COMPLETED. `stream_later`: the stream was busy (every slot taken); at each later
        poll time a slot free by then follows the job on the stream instead (one request to its end,
        and the end seen at once); if that stream fails, the job is polled at once and from then on."""
        async for number in poll_delays(start=start or self.config.poll_interval, cap=self.config.poll_max_interval):
            if stream_later and number and self.stream.free():
                status = await self.stream_status(handle, report)
                if not isinstance(status, StreamMiss):
                    return status
                stream_later = status is StreamMiss.BUSY  # (broken or not served: poll from now on)
            body = await self.status_once(handle, report)
            if body.get("status") == "COMPLETED":
                return body
        raise AssertionError("unreachable")  # poll_delays never ends

    async def status_once(self, handle: QueueHandle, report: ProgressReporter | None = None) -> dict[str, Any]:
        """One GET of the job's status (with its logs when progress is reported)."""
        url = _with_logs(handle.status_url) if report is not None else handle.status_url
        response = await get_with_retry(self.http, url, provider=PROVIDER, headers=self.headers())
        body = _json_or_none(response)
        if response.status_code not in (200, 202) or not isinstance(body, dict):
            raise map_failure(FalFailure.from_response(response), stage="status", model=handle.model)
        if report is not None:
            await report(body)
        return body

    async def stream_status(
        self,
        handle: QueueHandle,
        report: ProgressReporter | None = None,
        learn: Callable[[bool], None] | None = None,
    ) -> dict[str, Any] | StreamMiss:
        """Follow `{status_url}/stream` to the COMPLETED event, or say why not (the caller polls).
        `learn`: told whether the job was done when the stream opened."""
        url = stream_url(handle.status_url)
        if report is not None:
            url = _with_logs(url)
        return await self.stream.follow(url, {**self.headers(), "Accept": "text/event-stream"}, report, learn)

    async def result(self, handle: QueueHandle, status: Mapping[str, Any]) -> FalOutput:
        """GET response_url and branch on its HTTP status (200 is the only success)."""
        response = await self._get_result(handle.response_url)
        if response.status_code == 202:  # not finished yet (should not follow COMPLETED): ask again
            delays = poll_delays(start=self.config.poll_interval, cap=self.config.poll_max_interval)
            await anext(delays)  # poll 0: the GET above
            async for _ in delays:
                response = await self._get_result(handle.response_url)
                if response.status_code != 202:
                    break
        request_id = response_header(response, "x-fal-request-id") or handle.request_id
        if response.status_code != 200:
            failure = FalFailure.from_response(response, status_payload=status)
            raise map_failure(failure, stage="result", model=handle.model)
        body = _json(response)
        failed = status.get("error") is not None or status.get("error_type") is not None
        if failed and not (isinstance(body, dict) and body.get("images")):
            raise map_failure(FalFailure.from_status(status, request_id), stage="result", model=handle.model)
        return FalOutput(body, request_id)

    async def _get_result(self, url: str) -> httpx.Response:
        """One GET; only a transient answer (ingress error, 408/409/429, connection failure) is
        retried. A failed job's result repeats its error, so retrying that would only waste time."""
        try:
            response = await self.http.get(url, headers=self.headers())
        except httpx.HTTPError:
            response = None
        if response is None or (
            response.status_code in TRANSIENT_STATUSES and "x-fal-request-id" not in response.headers
        ):
            response = await get_with_retry(self.http, url, provider=PROVIDER, headers=self.headers())
        return response


def _with_logs(url: str) -> str:
    """The status URL asking for the job's logs (`?logs=1`), its own query kept."""
    return str(httpx.URL(url).copy_merge_params({"logs": "1"}))
