"""Drain a burst of async jobs: N jobs against the fake fal (about 0.2 s of model time each) with
`providers.fal.max_concurrent_jobs: 8`, in-process (uvicorn is not needed: the submits go through
httpx's ASGI transport, the gateway's upstream calls go over loopback to the fake).

Reported: submit latency (p50/p99 of the 202s), drain time, upstream submits, the most jobs the
fake saw in flight at once (from a submit to its result fetch), and the process's peak RSS.

    .venv/bin/python bench/jobs_drain.py            # N = 1000
    .venv/bin/python bench/jobs_drain.py -n 200
    .venv/bin/python bench/jobs_drain.py -n 200 --redis redis://127.0.0.1:6379/0   # the Redis engine
      (keys under a fresh `imagegate-bench:<uuid>:` prefix, deleted afterwards)
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
import uuid

import httpx
import redis
from _common import FAL_KEY, machine_line, percentile
from tests.fakes.fal import FakeFal, FalScenario
from tests.fakes.server import LocalServer

from imagegate.app import create_app
from imagegate.settings import load_settings

BODY = {"model": "qwen-image", "prompt": "a lighthouse", "size": "256x256", "response_format": "b64_json"}



async def drain(
    count: int, limit: int, workers: int, url: str, data_dir: str, redis_settings: dict[str, str]
) -> dict[str, float]:
    settings = load_settings(
        None,
        storage={"path": data_dir + "/images"},
        providers={
            "fal": {"key": FAL_KEY, "queue_url": url, "run_url": url + "/sync", "rest_url": url,
                    "poll_interval": 0.05, "poll_max_interval": 0.05, "max_concurrent_jobs": limit},
            "replicate": {"api_token": None}, "openai": {"api_key": None},
        },
        jobs={"workers": workers, "poll_seconds": 0.1},
        redis=redis_settings,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as client:
            latencies = []
            started = time.perf_counter()
            for _ in range(count):
                t0 = time.perf_counter()
                response = await client.post("/v1/images/generations", json=BODY, headers={"prefer": "respond-async"})
                latencies.append(time.perf_counter() - t0)
                assert response.status_code == 202, response.text
            submitted = time.perf_counter() - started
            store = app.state.jobs.store
            while True:
                counts = await store.counts()
                if counts.get("queued", 0) + counts.get("in_progress", 0) == 0:
                    break
                await asyncio.sleep(0.1)
            drained = time.perf_counter() - started
    return {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "submit": submitted,
            "drain": drained, "succeeded": counts.get("succeeded", 0), "failed": counts.get("failed", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--redis", default="", help="a Redis URL: the jobs on the Redis engine")
    args = parser.parse_args()
    prefix = f"imagegate-bench:{uuid.uuid4().hex}:"
    redis_settings = {"url": args.redis, "key_prefix": prefix} if args.redis else {}
    fake = FakeFal()
    fake.scenario = FalScenario(queue_polls=1, progress_polls=3)
    print(machine_line())
    try:
        with LocalServer(fake.app) as srv, tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(drain(args.n, args.limit, args.workers, srv.url, tmp, redis_settings))
    finally:
        if args.redis:
            client = redis.Redis.from_url(args.redis)
            keys = list(client.scan_iter(match=prefix + "*", count=500))
            if keys:
                client.delete(*keys)
            client.close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"engine={'redis' if args.redis else 'sqlite'} "
        f"jobs={args.n} max_concurrent_jobs={args.limit} workers={args.workers}: "
        f"submit p50 {result['p50'] * 1000:.1f} ms p99 {result['p99'] * 1000:.1f} ms, "
        f"all submitted in {result['submit']:.1f} s, drained in {result['drain']:.1f} s "
        f"(ideal {args.n / args.limit * 0.2:.1f} s); "
        f"succeeded {result['succeeded']:.0f} failed {result['failed']:.0f}; "
        f"upstream submits {len(fake.submits)}, peak in flight {fake.peak_in_flight()}; peak RSS {rss_mb:.0f} MB"
    )


if __name__ == "__main__":
    main()
