"""Hostile field names, oversized JSON generations, unexpected failures: clear answers, work off the loop."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
from fastapi import FastAPI


@pytest.mark.parametrize("name", ["sty\u20acle", "a\r\nx-evil: 1", "a b", "x" * 65, ""])
async def test_unsafe_field_names_are_a_400(client: httpx.AsyncClient, name: str) -> None:
    response = await client.post("/v1/images/generations", json={"model": "sandbox-image", "prompt": "p", name: 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "unknown_parameter" and "\n" not in (error["param"] or "")
    assert "x-evil" not in response.headers


async def test_safe_unknown_fields_reach_the_table(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/images/generations",
        json={"model": "sandbox-image", "prompt": "p", "style_preset.v2-b": 1, "size": "16x16"},
        headers={"x-imagegate-dry-run": "1"},
    )
    assert response.status_code == 200 and response.json()["params"]["style_preset.v2-b"] == "ignored"


async def test_large_generation_bodies_are_parsed_in_the_pool(app: FastAPI, client: httpx.AsyncClient) -> None:
    pool = app.state.pool
    threads: list[str] = []
    original = pool.run

    async def spy(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        def wrapped() -> Any:
            threads.append(threading.current_thread().name)
            return fn(*args, **kwargs)

        return await original(wrapped)

    pool.run = spy
    body = {"model": "sandbox-image", "prompt": "p", "size": "16x16", "notes": "x" * 400_000}
    response = await client.post("/v1/images/generations", json=body, headers={"x-imagegate-dry-run": "1"})
    assert response.status_code == 200
    assert threads and all(name.startswith("imagegate-image") for name in threads)
    assert threading.current_thread().name not in threads
