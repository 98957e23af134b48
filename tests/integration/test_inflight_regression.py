"""Thousands of requests in flight in one gateway process must finish in about the model's time.

2,000 concurrent generations, each a 1-s fal queue job polled with the real defaults, through the
real app (in-process, over ASGI, its lifespan run as a server runs it) whose shared upstream
client talks real HTTP to a lean fake fal (tests.fakes.lean_fal) on 127.0.0.1. With httpcore
1.0's connection pool the gateway's CPU went into re-scanning the pool's queue and such a burst
did not finish at all (bench/README.md, "In flight"). Every request must succeed with fal's own
URL, each job submitted once and never cancelled, within a few seconds of the model time.

The burst runs in a child process (this file run as a script) so a regression cannot hang the
suite: the child is killed after HARD_LIMIT seconds. CPU is checked as well as wall time: the old
failure was CPU burnt per request, and CPU does not depend on how busy the shared machine is.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

K = 2000
MODEL_SECONDS = 1.0
# Measured: ~5 s of CPU for the whole burst (client, gateway and fake together), ~5 s of wall on an
# idle 2-core machine, up to ~18 s when the machine is shared by many busy processes. The old pool
# did not finish such a burst in minutes.
MAX_WALL = 24.0
MAX_CPU_MS_PER_JOB = 6.0
HARD_LIMIT = 29.0
ROOT = Path(__file__).resolve().parents[2]


async def _burst(k: int, model_seconds: float, max_wall: float) -> dict[str, object]:
    import httpx
    from tests.fakes.lean_fal import LeanFal

    from imagegate.app import create_app
    from imagegate.settings import load_settings

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * k:  # sockets on both ends of every upstream connection, with room
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * k), hard))
    fake = LeanFal(key="test-fal-key", model_seconds=model_seconds)
    fal_url = await fake.start()
    storage = tempfile.mkdtemp(prefix="imagegate-inflight-")
    fal = {"key": "test-fal-key", "key_id": None, "key_secret": None, "queue_url": fal_url, "run_url": fal_url,
           "rest_url": fal_url, "mode": "queue", "status_stream": False}
    settings = load_settings(
        None,
        storage={"path": storage},
        delivery={"url_mode": "passthrough"},
        routing={"deadline_seconds": 60},
        providers={"fal": fal, "replicate": {"api_token": None}, "openai": {"api_key": None}},
    )
    app = create_app(settings)
    body = {"model": "qwen-image", "prompt": "a lighthouse at dusk", "response_format": "url"}
    outcome: dict[str, object] = {"fal_url": fal_url}
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60
        ) as client:

            async def one() -> str:
                response = await client.post("/v1/images/generations", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code} {response.text[:300]}")
                return str(response.json()["data"][0]["url"])

            cpu, started = time.process_time(), time.monotonic()
            try:
                async with asyncio.timeout(max_wall):
                    urls = await asyncio.gather(*(one() for _ in range(k)), return_exceptions=True)
            except TimeoutError:
                urls = []
                outcome["timed_out"] = True
            outcome["wall"] = time.monotonic() - started
            outcome["cpu"] = time.process_time() - cpu
    finally:
        await fake.close()
    outcome["ok"] = sum(1 for url in urls if url == f"{fal_url}/files/out.png")
    outcome["errors"] = sorted({str(u)[:200] for u in urls if not isinstance(u, str)})[:3]
    outcome["submits"] = fake.stats.submits
    outcome["cancels"] = fake.stats.cancels
    outcome["status_polls"] = fake.stats.status_polls
    return outcome


def test_two_thousand_jobs_in_flight_finish_near_the_model_time() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        child = subprocess.run(
            [sys.executable, __file__, str(K), str(MODEL_SECONDS), str(MAX_WALL)],
            capture_output=True, text=True, timeout=HARD_LIMIT, cwd=ROOT, env=env, check=False,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{K} concurrent jobs: the gateway did not even give up within {HARD_LIMIT} s") from None
    assert child.returncode == 0, child.stderr[-2000:]
    outcome = json.loads(child.stdout.strip().splitlines()[-1])
    assert not outcome.get("timed_out"), f"{K} concurrent {MODEL_SECONDS}-s jobs did not finish in {MAX_WALL} s"
    assert outcome["ok"] == K, outcome
    assert outcome["submits"] == K  # one submit per request: nothing retried or resubmitted
    assert outcome["cancels"] == 0
    assert outcome["status_polls"] >= K
    assert MODEL_SECONDS <= outcome["wall"] <= MAX_WALL
    assert 1000 * outcome["cpu"] / K <= MAX_CPU_MS_PER_JOB, outcome


if __name__ == "__main__":
    k, model_seconds, max_wall = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    print(json.dumps(asyncio.run(_burst(k, model_seconds, max_wall))))
