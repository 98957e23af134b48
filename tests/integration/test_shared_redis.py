"""Two gateway processes (uvicorn subprocesses on two free ports) sharing one Redis: one budget.

A key with `rpm: 5` gets exactly 5 successes across both, then 429 with `retry-after`; a key with
`max_concurrent: 2` never has more than 2 requests in flight across both; an Idempotency-Key sent
to both runs once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from tests.redis_support import redis_prefix, redis_url

__all__ = ["redis_prefix", "redis_url"]

RPM_KEY = "sk-rpm-five"
CONC_KEY = "sk-two-at-once"
DELAY = 1.5  # sandbox latency: long enough for every concurrent request to overlap


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(config: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "IMAGEGATE_CONFIG": str(config)}
    command = [sys.executable, "-m", "uvicorn", "--factory", "imagegate.app:app_from_env"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"gateway exited: {log.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"gateway did not become ready: {log.read_text()}")


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[list[str]]:
    from tests.redis_support import delete_prefix

    prefix = f"imagegate-test:shared-{os.getpid()}-{time.monotonic_ns()}:"
    root = tmp_path_factory.mktemp("shared")
    config = {
        "storage": {"path": str(root / "images")},
        "providers": {"sandbox": {"delay_seconds": DELAY}},
        "models": {"sandbox-image": {"routes": [{"provider": "sandbox", "model": "sandbox-image"}]}},
        "redis": {"url": redis_url, "key_prefix": prefix},
        "auth": {
            "keys": [
                {"name": "rpm-five", "key": RPM_KEY, "rpm": 5},
                {"name": "two-at-once", "key": CONC_KEY, "max_concurrent": 2},
            ]
        },
    }
    path = root / "imagegate.yaml"
    path.write_text(yaml.safe_dump(config))
    procs = [start(path, root / f"gateway-{i}.log") for i in range(2)]
    try:
        for i, (proc, url) in enumerate(procs):
            wait_ready(proc, url, root / f"gateway-{i}.log")
        yield [url for _, url in procs]
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        delete_prefix(redis_url, prefix)


async def post(http: httpx.AsyncClient, url: str, key: str, **headers: str) -> httpx.Response:
    return await http.post(
        url + "/v1/images/generations",
        json={"model": "sandbox-image", "prompt": "x", "size": "64x64"},
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=30,
    )


async def test_rpm_is_one_budget_across_two_processes(gateways: list[str]) -> None:
    async with httpx.AsyncClient() as http:
        responses = await asyncio.gather(*(post(http, gateways[i % 2], RPM_KEY) for i in range(8)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 5 + [429] * 3
        served_by = {r.url.port for r in responses if r.status_code == 200}
        assert len(served_by) == 2  # both processes served some
        refused = [r for r in responses if r.status_code == 429]
        for response in refused:
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(response.headers["retry-after"]) <= 60
            assert response.headers["x-ratelimit-limit-requests"] == "5"
            assert response.headers["x-ratelimit-remaining-requests"] == "0"
        for url in gateways:  # and each process keeps refusing
            assert (await post(http, url, RPM_KEY)).status_code == 429


async def test_max_concurrent_holds_across_two_processes(gateways: list[str]) -> None:
    async with httpx.AsyncClient() as http:
        responses = await asyncio.gather(*(post(http, gateways[i % 2], CONC_KEY) for i in range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 429, 429, 429, 429]
        assert all("in flight" in r.json()["error"]["message"] for r in responses if r.status_code == 429)
        # The slots came back: two at once again, one on each process.
        again = await asyncio.gather(post(http, gateways[0], CONC_KEY), post(http, gateways[1], CONC_KEY))
        assert [r.status_code for r in again] == [200, 200]


async def usage_requests(http: httpx.AsyncClient, url: str, key: str) -> int:
    response = await http.get(url + "/v1/usage", headers={"authorization": f"Bearer {key}"})
    (row,) = response.json()["data"]
    count: int = row["requests"]
    return count


async def test_idempotency_key_runs_once_across_two_processes(gateways: list[str]) -> None:
    async with httpx.AsyncClient() as http:
        before = await usage_requests(http, gateways[0], CONC_KEY)
        first, second = await asyncio.gather(
            post(http, gateways[0], CONC_KEY, **{"idempotency-key": "cross"}),
            post(http, gateways[1], CONC_KEY, **{"idempotency-key": "cross"}),
        )
        assert await usage_requests(http, gateways[1], CONC_KEY) == before + 1  # one request was served
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert sorted(r.headers.get("idempotent-replayed", "-") for r in (first, second)) == ["-", "true"]
    assert [r.headers["x-imagegate-cost-usd"] for r in (first, second)] == ["0.0000", "0.0000"]  # unpriced
