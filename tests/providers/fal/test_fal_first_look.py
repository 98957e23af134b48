"""The first status look before the fal status stream is taken only while it pays for the model
(`status.FirstLook`): checked on the requests the fake fal receives per job."""

from __future__ import annotations

import asyncio
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


@pytest.mark.parametrize(
    ("body", "done"),
    [
        (b'data: {"status": "COMPLETED"}\n\n', True),
        (b'data: {"status": "COMPLETED"}', True),  # the only event, unterminated: the stream's first
        (b'data: {"status": "IN_PROGRESS"}\n\ndata: {"status": "COMPLETED"}\n\n', False),
        (b'data: {"status": "IN_PROGRESS"}\n\ndata: {"status": "COMPLETED"}', False),  # its second
    ],
)
@pytest.mark.parametrize("plain", [True, False])
async def test_the_stream_teaches_whether_completed_was_its_first_event(body: bytes, done: bool, plain: bool) -> None:
    """`learn` is told whether the COMPLETED event was the stream's first, also when that event is
    the unterminated end of the stream (on the plain path and on httpx's)."""
    import asyncio

    from imagegate.providers.fal.stream import StatusStream

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/fal-ai/x/requests/r1/status/stream"
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=4)
    learned: list[bool] = []
    client = upstream_client(limits=limits, timeout=httpx.Timeout(2.0)) if plain else httpx.AsyncClient()
    try:
        async with client:
            found = await StatusStream(client, 10).follow(url, {"Authorization": "Key k"}, None, learned.append)
    finally:
        server.close()
    assert found == {"status": "COMPLETED"}
    assert learned == [done]


async def test_a_job_polling_because_every_stream_was_taken_takes_one_that_frees_up(
    fal: tuple[FakeFal, LocalServer],
) -> None:
    """With one stream slot: the first job streams; the second finds it taken and polls, and at its
    first poll after the first job ended it follows the stream instead (no more polls)."""
    fake, srv = fal
    fake.reset()
    config = FalSettings(
        **fal_provider_settings(srv.url, status_stream=True, status_stream_max=1, poll_interval=0.2,
                                poll_max_interval=0.2)
    )
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=4)
    async with upstream_client(limits=limits, timeout=httpx.Timeout(10.0)) as http:
        transport = FalTransport(http, config)
        fake.scenario = FalScenario(model_seconds=0.3)
        first = asyncio.create_task(transport.run_queued(MODEL, PAYLOAD, deadline=time.monotonic() + 10))
        while not fake.stream_opens:
            await asyncio.sleep(0.01)
        fake.scenario = FalScenario(model_seconds=2.0)
        second = await transport.run_queued(MODEL, PAYLOAD, deadline=time.monotonic() + 10)
        assert (await first).body["images"] and second.body["images"]
        assert transport.stream.open == 0
    second_id = second.request_id
    assert fake.stream_opens[0] != second_id and fake.stream_opens[1:] == [second_id]
    polls = [r for r in fake.requests if r.path.endswith(f"{second_id}/status")]
    # the look, poll 0 when the stream was busy, then ~0.2 s polls until the first job's end (0.3 s):
    # a few, not the ~10 that 2 s of polling would take
    assert 1 <= len(polls) <= 5, len(polls)
