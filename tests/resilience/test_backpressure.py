"""The in-flight budget (api/admission.py): a burst beyond it gets fast 503 server_busy with
retry-after, the rest succeed, the budget is released on every path, and the server's RSS stays
within the documented bound. Integration tests run the real `imagegate serve` on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from tests.conftest import gateway_settings
from tests.fakes.images import png_bytes
from tests.integration.gateway_process import GatewayProcess, rss_bytes, write_config

from imagegate.api.admission import AdmissionMiddleware, Budget, ServerBusy
from imagegate.app import create_app

MiB = 1024 * 1024
BUSY_ENVELOPE = {
    "error": {
        "message": "The server is busy with other image requests. Please retry after a short delay.",
        "type": "server_error",
        "param": None,
        "code": "server_busy",
    }
}


# -- the budget itself -------------------------------------------------------------------------------


async def test_requests_beyond_the_budget_are_refused_at_once_and_slots_come_back() -> None:
    budget = Budget(max_requests=2, max_bytes=100)
    a, b = await budget.admit(10), await budget.admit(10)
    with pytest.raises(ServerBusy) as busy:
        await budget.admit(0)
    assert busy.value.status == 503 and busy.value.retry_after == 1.0
    budget.release(a)
    budget.release(a)  # idempotent
    assert (budget.requests, budget.bytes) == (1, 10)
    c = await budget.admit(90)
    with pytest.raises(ServerBusy):
        await budget.admit(0)  # no request slot
    budget.release(b)
    with pytest.raises(ServerBusy):
        await budget.admit(11)  # a slot, but not 11 bytes
    budget.release(c)
    assert (budget.requests, budget.bytes) == (0, 0)


async def test_a_request_larger_than_the_whole_budget_runs_alone() -> None:
    budget = Budget(max_requests=10, max_bytes=100)
    big = await budget.admit(10_000)
    assert big.bytes == 100
    with pytest.raises(ServerBusy):
        await budget.admit(1)
    budget.release(big)
    assert budget.bytes == 0


async def test_the_queue_waits_in_order_and_is_bounded() -> None:
    budget = Budget(max_requests=1, max_bytes=100, max_queued=2, queue_timeout=5)
    first = await budget.admit(10)
    second = asyncio.ensure_future(budget.admit(10))
    third = asyncio.ensure_future(budget.admit(10))
    await asyncio.sleep(0.01)
    assert budget.queued == 2
    with pytest.raises(ServerBusy):
        await budget.admit(10)  # the queue is full
    budget.release(first)
    ticket = await asyncio.wait_for(second, 1)
    assert not third.done()
    budget.release(ticket)
    budget.release(await asyncio.wait_for(third, 1))
    assert (budget.requests, budget.bytes, budget.queued) == (0, 0, 0)


async def test_a_queued_request_gives_up_after_the_timeout_and_a_cancelled_one_leaves_no_trace() -> None:
    budget = Budget(max_requests=1, max_bytes=100, max_queued=4, queue_timeout=0.05)
    held = await budget.admit(10)
    started = time.monotonic()
    with pytest.raises(ServerBusy):
        await budget.admit(10)
    assert 0.04 <= time.monotonic() - started < 1
    waiting = asyncio.ensure_future(budget.admit(10))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    budget.release(held)
    assert (budget.requests, budget.bytes, budget.queued) == (0, 0, 0)


async def test_settle_gives_back_an_overestimate_and_waits_for_more() -> None:
    budget = Budget(max_requests=10, max_bytes=100, max_queued=4, queue_timeout=5)
    a = await budget.admit(90)
    waiting = asyncio.ensure_future(budget.admit(50))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await budget.settle(a, 40)  # the estimate was too high: the queued request gets in
    b = await asyncio.wait_for(waiting, 1)
    assert (budget.bytes, a.bytes, b.bytes) == (90, 40, 50)
    grow = asyncio.ensure_future(budget.settle(a, 45))  # 95 fits
    await asyncio.wait_for(grow, 1)
    grow = asyncio.ensure_future(budget.settle(a, 60))  # 110 does not: waits for b
    await asyncio.sleep(0.01)
    assert not grow.done()
    budget.release(b)
    await asyncio.wait_for(grow, 1)
    budget.release(a)
    assert (budget.requests, budget.bytes) == (0, 0)


async def test_memory_is_trimmed_once_a_burst_is_over() -> None:
    trims: list[float] = []
    budget = Budget(
        max_requests=10, max_bytes=1600, trim_after_bytes=1000, trim_delay=0.05, trim=lambda: trims.append(1)
    )
    tickets = [await budget.admit(400) for _ in range(3)]
    for ticket in tickets[:-1]:
        budget.release(ticket)
    await asyncio.sleep(0.1)
    assert trims == []  # 400 bytes still in flight: the burst is not over
    budget.release(tickets[-1])
    again = await budget.admit(400)  # a new request within the quiet period: no trim yet
    await asyncio.sleep(0.1)
    assert trims == []
    budget.release(again)
    await asyncio.sleep(0.1)  # quiet for trim_delay: the trim runs (in a thread)
    assert trims == [1] and budget.trims == 1
    budget.release(await budget.admit(10))
    await asyncio.sleep(0.1)
    assert trims == [1]  # not after a trickle


async def test_a_body_without_content_length_is_counted_as_it_streams_in() -> None:
    budget = Budget(max_requests=10, max_bytes=1000)
    held = await budget.admit(900)
    seen: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(budget.bytes)
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    chunks = [{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 3
    chunks.append({"type": "http.request", "body": b"", "more_body": False})

    async def receive() -> Any:
        return chunks.pop(0)

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations", "headers": [], "state": {}}
    with pytest.raises(ServerBusy):  # 900 held + 60 fit, the next 60 do not
        await AdmissionMiddleware(app, budget=budget)(scope, receive, send)
    assert seen == [960]
    assert (budget.requests, budget.bytes) == (1, 900)  # the refused request gave everything back
    budget.release(held)
    chunks[:] = [{"type": "http.request", "body": b"x" * 60, "more_body": False}]
    await AdmissionMiddleware(app, budget=budget)(scope, receive, send)
    assert sent[-1]["body"] == b"ok" and (budget.requests, budget.bytes) == (0, 0)


async def test_inputs_that_decode_larger_than_the_budget_allows_get_503_and_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A small body that decodes big (a flat 2000x2000 PNG: ~10 KB, 2 x 16 MB charged): the second
    of two such requests cannot settle its share and gets 503, logged by the budget only."""
    settings = gateway_settings(
        tmp_path,
        limits={"max_inflight_bytes": 40 * MiB, "max_queued": 0, "queue_timeout_seconds": 0},
        providers={"sandbox": {"delay_seconds": 0.5}},
    )
    app = create_app(settings)
    flat = png_bytes(2000, 2000)
    assert len(flat) < 100_000
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30
    ) as client:
        responses = await asyncio.gather(_edit(client, flat), _edit(client, flat))
    assert sorted(r.status_code for r in responses) == [200, 503]
    _assert_busy(next(r for r in responses if r.status_code == 503))
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([line for line in lines if line.startswith("server busy:")]) == 1
    assert not [line for line in lines if "ServerBusy" in line], lines
    assert (app.state.budget.requests, app.state.budget.bytes) == (0, 0)


# -- against the real server ---------------------------------------------------------------------


def _edit(client: httpx.Client | httpx.AsyncClient, image: bytes) -> Any:
    return client.post(
        "/v1/images/edits",
        data={"model": "sandbox-edit", "prompt": "grayscale", "response_format": "b64_json"},
        files={"image": ("in.png", image, "image/png")},
    )


async def _burst(url: str, image: bytes, count: int) -> list[tuple[httpx.Response, float]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one() -> tuple[httpx.Response, float]:
            started = time.monotonic()
            response = await _edit(client, image)
            return response, time.monotonic() - started

        return list(await asyncio.gather(*(one() for _ in range(count))))


def _assert_busy(response: httpx.Response) -> None:
    assert response.status_code == 503
    assert response.json() == BUSY_ENVELOPE
    assert response.headers["retry-after"] == "1"
    assert response.headers["retry-after-ms"] == "1000"
    assert response.headers["x-request-id"].startswith("req_")
    assert "x-should-retry" not in response.headers  # the SDKs retry it


def _assert_edited(response: httpx.Response, size: tuple[int, int]) -> None:
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert image.size == size


@pytest.fixture
def small_budget(tmp_path: Path) -> Iterator[GatewayProcess]:
    config = write_config(
        tmp_path / "config.yaml",
        limits={"max_inflight_requests": 4, "max_queued": 0, "queue_timeout_seconds": 0},
        providers={"sandbox": {"delay_seconds": 1.0}},
        routing={"keepalive_seconds": 0.2},  # streams start (headers, keepalives) before their result
    )
    with GatewayProcess(tmp_path, config) as gateway:
        yield gateway


async def test_a_burst_at_twice_the_request_budget_gets_fast_503s_and_the_rest_succeed(
    small_budget: GatewayProcess,
) -> None:
    results = await _burst(small_budget.url, png_bytes(96, 64), 8)
    ok = [(r, t) for r, t in results if r.status_code == 200]
    busy = [(r, t) for r, t in results if r.status_code != 200]
    assert len(ok) == 4 and len(busy) == 4
    for response, elapsed in busy:
        _assert_busy(response)
        assert elapsed < 0.9  # refused before the 1 s the admitted ones take
    for response, elapsed in ok:
        _assert_edited(response, (96, 64))
        assert elapsed >= 1.0
    # every slot came back: a second burst of four all succeed
    again = await _burst(small_budget.url, png_bytes(96, 64), 4)
    assert [r.status_code for r, _ in again] == [200] * 4


async def test_a_stream_holds_its_slot_until_it_ends(small_budget: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=small_budget.url, timeout=30) as client:
        body = {"model": "sandbox-image", "prompt": "a lighthouse", "size": "64x64", "stream": True}
        streams = [client.stream("POST", "/v1/images/generations", json=body) for _ in range(4)]
        responses = await asyncio.gather(*(s.__aenter__() for s in streams))
        try:
            assert [r.status_code for r in responses] == [200] * 4
            _assert_busy(await client.post("/v1/images/generations", json={**body, "stream": False}))
            for response in responses:
                assert b"image_generation.completed" in await response.aread()
        finally:
            for stream in streams:
                await stream.__aexit__(None, None, None)
        response = await client.post("/v1/images/generations", json={**body, "stream": False})
        assert response.status_code == 200


async def test_the_queue_lets_a_short_wait_succeed(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        limits={"max_inflight_requests": 2, "max_queued": 2, "queue_timeout_seconds": 5},
        providers={"sandbox": {"delay_seconds": 0.5}},
    )
    with GatewayProcess(tmp_path, config) as gateway:
        results = await _burst(gateway.url, png_bytes(32, 32), 6)
    codes = sorted(r.status_code for r, _ in results)
    assert codes == [200, 200, 200, 200, 503, 503]
    waited = sorted(t for r, t in results if r.status_code == 200)
    assert waited[-1] >= 0.9  # two of them waited for a slot


def _noise_png(side: int) -> bytes:
    image = Image.frombytes("RGB", (side, side), random.Random(side).randbytes(side * side * 3))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=0)
    return out.getvalue()


def test_a_burst_of_large_edits_keeps_rss_within_the_byte_budget(tmp_path: Path) -> None:
    """12 concurrent 5 MB edits cost ~18 MiB each (body + decoded + output): ~220 MiB unbounded.
    With a 48 MiB budget the server's RSS grows by at most the budget plus a fixed allowance."""
    budget = 48 * MiB
    config = write_config(
        tmp_path / "config.yaml",
        limits={"max_inflight_bytes": budget, "max_queued": 0, "queue_timeout_seconds": 0},
        providers={"sandbox": {"delay_seconds": 0.5}},
    )
    image = _noise_png(1290)  # ~5 MB, incompressible
    with GatewayProcess(tmp_path, config) as gateway:
        with httpx.Client(base_url=gateway.url, timeout=30) as client:  # warm up the image pool
            _assert_edited(_edit(client, png_bytes(64, 64)), (64, 64))
        before = rss_bytes(gateway.pid)
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_bytes(gateway.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            results = asyncio.run(_burst(gateway.url, image, 12))
        finally:
            stop.set()
            sampler.join()
    codes = [r.status_code for r, _ in results]
    assert codes.count(200) >= 2 and codes.count(503) >= 6, codes
    for response, _ in results:
        if response.status_code == 503:
            _assert_busy(response)
        else:
            _assert_edited(response, (1290, 1290))
    assert peak[0] - before <= budget + 40 * MiB, f"RSS grew by {(peak[0] - before) / MiB:.0f} MiB"
