"""A duplicate that waits for its first request (same Idempotency-Key) holds no share of the
in-flight budget for the images it will not decode: a client repeating a slow request must not
fill the budget that every other client shares (waiting duplicates pass no per-key limit)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from tests.conftest import gateway_settings
from tests.fakes.images import png_bytes

from imagegate.app import create_app

SIDE = 1500  # decoded: 9 MB; a request's share is its body plus twice that
IMAGE = png_bytes(SIDE, SIDE)
DECODED = SIDE * SIDE * 4
SLOW = "blur 40 sharpen blur 40 sharpen blur 40"


async def edit(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post(
        "/v1/images/edits",
        headers={"idempotency-key": key},
        data={"model": "sandbox-edit", "prompt": SLOW, "size": "1536x1536"},
        files={"image": ("a.png", IMAGE, "image/png")},
    )


def gateway(tmp_path: Path) -> tuple[FastAPI, httpx.AsyncClient]:
    app = create_app(gateway_settings(tmp_path))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=120)
    return app, client


def count_waiters(app: FastAPI) -> Callable[[], int]:
    """How many duplicates have started waiting for their first request (and given back their
    decoded share): what the tests wait for, rather than a fixed time a loaded machine may exceed."""
    idempotency = app.state.access.idempotency
    run = idempotency.run
    waiting = 0

    async def counted_run(*args: Any, on_wait: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        async def counted() -> None:
            nonlocal waiting
            if on_wait is not None:
                await on_wait()
            waiting += 1

        return await run(*args, on_wait=counted, **kwargs)

    idempotency.run = counted_run
    return lambda: waiting


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def test_waiting_duplicates_give_back_their_decoded_share(tmp_path: Path) -> None:
    app, client = gateway(tmp_path)
    budget = app.state.budget
    waiting = count_waiters(app)
    async with app.router.lifespan_context(app), client:
        first = asyncio.create_task(edit(client, "waiters-1"))
        while budget.requests < 1 or budget.bytes < 2 * DECODED:  # the first runs, its inputs charged
            await asyncio.sleep(0.01)
        held_by_first = budget.bytes
        duplicates = [asyncio.create_task(edit(client, "waiters-1")) for _ in range(3)]
        await until(lambda: waiting() == 3 or first.done())  # parsed, charged, now waiting for the first
        assert not first.done(), "the first request finished too early for this test"
        assert waiting() == 3 and budget.requests == 4
        waiting_share = budget.bytes - held_by_first
        assert waiting_share < 3 * (len(IMAGE) + DECODED), waiting_share  # bodies only, no decoded images
        responses = await asyncio.gather(first, *duplicates)
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.headers.get("idempotent-replayed") for r in responses[1:]] == ["true"] * 3
    assert budget.requests == 0 and budget.bytes == 0


async def test_a_duplicate_that_takes_over_is_charged_again(tmp_path: Path) -> None:
    """The first request's client leaves: the waiting duplicate runs the work itself, holding its
    full share again while it does, and everything is given back at the end."""
    app, client = gateway(tmp_path)
    budget = app.state.budget
    waiting = count_waiters(app)
    async with app.router.lifespan_context(app), client:
        first = asyncio.create_task(edit(client, "waiters-2"))
        while budget.bytes < 2 * DECODED:
            await asyncio.sleep(0.01)
        duplicate = asyncio.create_task(edit(client, "waiters-2"))
        await until(lambda: waiting() == 1 or first.done())
        assert not first.done(), "the first request finished too early for this test"
        first.cancel()  # the first client goes away; its work is cancelled
        await asyncio.gather(first, return_exceptions=True)  # its share is back: what follows is the duplicate's
        peak = 0
        while not duplicate.done():
            peak = max(peak, budget.bytes)
            await asyncio.sleep(0.01)
        response = duplicate.result()
    assert response.status_code == 200 and "idempotent-replayed" not in response.headers
    assert peak >= 2 * DECODED  # charged for its DECODED inputs while it worked
    assert budget.requests == 0 and budget.bytes == 0
