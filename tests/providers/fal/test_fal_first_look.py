"""The first status look before the fal status stream is taken only while it pays for the model
(`status.FirstLook`): checked on the requests the fake fal receives per job."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from tests.fakes.fal import FakeFal, FalScenario, fal_provider_settings
from tests.fakes.server import LocalServer

from imagegate.providers.fal.status import FirstLook
from imagegate.providers.fal.transport import FalTransport
from imagegate.settings import FalSettings
from imagegate.upstream_http import upstream_client

MODEL = "fal-ai/qwen-image"
PAYLOAD = {"prompt": "a lighthouse at dusk", "num_images": 1}
MISSES_TO_SKIP = 36  # (15/16)**35 = 0.104 >= FLOOR > (15/16)**36 = 0.098


def test_the_look_stops_after_misses_and_comes_back_on_a_job_done_at_once() -> None:
    look = FirstLook()
    assert look.worth(MODEL) and look.worth("other")
    for seen in range(MISSES_TO_SKIP):
        assert look.worth(MODEL), seen
        look.saw(MODEL, False)
    assert not look.worth(MODEL)
    assert look.worth("other")  # per model
    look.saw(MODEL, True)  # the stream's first event was COMPLETED
    assert look.worth(MODEL)


def test_the_table_of_models_is_bounded() -> None:
    look = FirstLook()
    for index in range(FirstLook.MODELS * 3):
        look.saw(f"model-{index}", False)
    assert len(look.rates) <= FirstLook.MODELS


@pytest.fixture(scope="module")
def fal() -> Iterator[tuple[FakeFal, LocalServer]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv


def _kinds(fake: FakeFal) -> list[str]:
    """What each request of the fake was: submit, status, stream or result."""
    kinds = []
    for request in fake.requests:
        if request.method == "POST":
            kinds.append("submit")
        elif request.path.endswith("/status/stream"):
            kinds.append("stream")
        elif request.path.endswith("/status"):
            kinds.append("status")
        else:
            kinds.append("result")
    return kinds


async def test_a_slow_model_stops_paying_the_look_and_a_fast_one_gets_it_back(
    fal: tuple[FakeFal, LocalServer],
) -> None:
    fake, srv = fal
    config = FalSettings(**fal_provider_settings(srv.url, status_stream=True))
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=4)
    async with upstream_client(limits=limits, timeout=httpx.Timeout(10.0)) as http:
        transport = FalTransport(http, config)

        async def job() -> list[str]:
            fake.reset()
            output = await transport.run_queued(MODEL, PAYLOAD, deadline=time.monotonic() + 10)
            assert output.body["images"]
            return _kinds(fake)

        fake.scenario = FalScenario(model_seconds=0.05)  # still running at the first look
        for _ in range(MISSES_TO_SKIP):
            assert await job() == ["submit", "status", "stream", "result"]
        for _ in range(3):  # the look no longer pays: one request less per job
            assert await job() == ["submit", "stream", "result"]

        fake.scenario = FalScenario.instant()  # done at once: the stream's first event says so ...
        assert await job() == ["submit", "stream", "result"]
        for _ in range(3):  # ... and the look is back: no stream at all
            assert await job() == ["submit", "status", "result"]
