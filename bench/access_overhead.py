"""What client keys, limits, idempotency and usage add to a request, in memory and on Redis.

The fake fal (COMPLETED on the first poll) and one gateway per phase run under uvicorn on
127.0.0.1; one httpx client sends N generations at concurrency C per phase, phases interleaved
over `--rounds`. Phases: `open` (no keys: the baseline), `keys-memory` (a key with rpm,
images_per_minute and max_concurrent, all in memory), `keys-redis` (the same on Redis), and
`idem-redis` (also a fresh Idempotency-Key per request: a claim and a stored record each).
Reports requests/s and p50/p95 latency, and each phase's ratio to `open` from the same run.

`--micro` instead times the access layer alone, in process, per request: admit + release under
limits, plus the usage record (`limits+usage`), plus an idempotency claim and its stored record
(`+idempotency`), in memory and on Redis, over `-n` sequential requests.

    .venv/bin/python bench/access_overhead.py            # ~40 s
    IMAGEGATE_TEST_REDIS_URL=redis://host:6379/1 .venv/bin/python bench/access_overhead.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import redis
from bench._common import fal_gateway_settings, fmt_ms, machine_line, percentile, ratio
from tests.fakes.fal import FakeFal, FalScenario
from tests.fakes.server import LocalServer

from imagegate.app import create_app

KEY = "sk-bench"
LIMITS = {"rpm": 1_000_000, "images_per_minute": 1_000_000, "max_concurrent": 10_000}


async def phase(url: str, n: int, c: int, idempotent: bool, max_seconds: float) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue = iter(range(n))
    deadline = time.monotonic() + max_seconds

    async def worker(http: httpx.AsyncClient) -> None:
        for _ in queue:
            if time.monotonic() > deadline:
                return
            headers = {"authorization": f"Bearer {KEY}"}
            if idempotent:
                headers["idempotency-key"] = uuid.uuid4().hex
            started = time.perf_counter()
            response = await http.post(
                url + "/v1/images/generations", json={"model": "qwen-image", "prompt": "x"}, headers=headers
            )
            if response.status_code != 200:
                raise SystemExit(f"{response.status_code}: {response.text}")
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=c)) as http:
        for _ in range(16):  # warm-up
            await http.get(url + "/healthz")
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(c)))
        return len(latencies) / (time.perf_counter() - started), latencies


async def micro(n: int, redis_url: str, prefix: str) -> None:
    from imagegate.auth.keys import KeyLimits
    from imagegate.core.request import ImageRequest
    from imagegate.core.results import ImageResult, OutputImage
    from imagegate.idempotency import Idempotency, MemoryStore, RedisStore
    from imagegate.limits import MemoryLimiter, RedisLimiter
    from imagegate.settings import RedisSettings
    from imagegate.state.redis import connect
    from imagegate.storage.local import LocalStorage
    from imagegate.usage import MemoryLedger, RedisLedger

    limits = KeyLimits(**LIMITS)
    client = connect(RedisSettings(url=redis_url))
    assert client is not None
    result = ImageResult(1, [OutputImage(url="https://x/y.png")], "1024x1024", "png", "high", "opaque")

    async def work() -> ImageResult:
        return result

    with tempfile.TemporaryDirectory() as tmp:
        storage = LocalStorage(tmp)
        setups = {
            "memory": (MemoryLimiter(), MemoryLedger(), MemoryStore()),
            "redis": (
                RedisLimiter(client, prefix=prefix),
                RedisLedger(client, prefix=prefix),
                RedisStore(client, prefix=prefix),
            ),
        }
        print(f"{'state':<8} {'limits+usage':>14} {'+idempotency':>14}  (per request, mean of {n})")
        for name, (limiter, ledger, store) in setups.items():
            guard = Idempotency(store, storage, ttl_seconds=60, lease_seconds=30, max_wait_seconds=5)
            timings = []
            for idempotent in (False, True):
                started = time.perf_counter()
                for i in range(n):
                    async with limiter.admit("bench", limits, 1):
                        if idempotent:
                            request = ImageRequest(operation="generate", prompt=str(i), model="m")
                            await guard.run("bench", uuid.uuid4().hex, request, work)
                    await ledger.record("bench", images=1, megapixels=1.0, cost_usd=0.03)
                timings.append((time.perf_counter() - started) / n)
            print(f"{name:<8} {fmt_ms(timings[0]):>14} {fmt_ms(timings[1]):>14}")
        await storage.close()
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=300, help="requests per phase and round")
    parser.add_argument("-c", type=int, default=16, help="concurrency")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--phase-seconds", type=float, default=20)
    parser.add_argument("--micro", action="store_true", help="time the access layer alone, in process")
    args = parser.parse_args()
    redis_url = os.environ.get("IMAGEGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"imagegate-bench:{uuid.uuid4().hex}:"
    if args.micro:
        print(machine_line())
        try:
            asyncio.run(micro(min(args.n, 5000), redis_url, prefix))
        finally:
            cleanup(redis_url, prefix)
        return
    fake = FakeFal()
    fake.scenario = FalScenario.instant()
    results: dict[str, list[Any]] = {}
    print(machine_line())
    with LocalServer(fake.app) as fal, tempfile.TemporaryDirectory() as tmp:
        base = fal_gateway_settings(tmp, fal.url)
        keyed = {"keys": [{"name": "bench", "key": KEY, **LIMITS}]}
        phases = {
            "open": (base, False),
            "keys-memory": (base.model_copy(update={"auth": base.auth.model_validate(keyed)}), False),
            "keys-redis": (
                base.model_copy(
                    update={
                        "auth": base.auth.model_validate(keyed),
                        "redis": base.redis.model_copy(update={"url": redis_url, "key_prefix": prefix}),
                    }
                ),
                False,
            ),
        }
        phases["idem-redis"] = (phases["keys-redis"][0], True)
        try:
            for _ in range(args.rounds):
                for name, (settings, idempotent) in phases.items():
                    fake.reset()
                    with LocalServer(create_app(settings)) as gateway:
                        rps, latencies = asyncio.run(phase(gateway.url, args.n, args.c, idempotent, args.phase_seconds))
                    results.setdefault(name, []).append((rps, latencies))
        finally:
            cleanup(redis_url, prefix)
    base_rps = sum(r for r, _ in results["open"]) / len(results["open"])
    base_p50 = percentile([x for _, ls in results["open"] for x in ls], 50)
    print(f"{'phase':<12} {'req/s':>8} {'vs open':>8} {'p50':>9} {'p95':>9} {'p50 vs open':>12}")
    for name, runs in results.items():
        rps = sum(r for r, _ in runs) / len(runs)
        latencies = [x for _, ls in runs for x in ls]
        p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
        print(
            f"{name:<12} {rps:8.1f} {ratio(rps, base_rps):>8.2f} {fmt_ms(p50):>9} {fmt_ms(p95):>9} "
            f"{ratio(p50, base_p50):>12.2f}"
        )


def cleanup(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


if __name__ == "__main__":
    main()
