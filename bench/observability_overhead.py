"""What the observability seam (metrics + request log) costs per request, against the same app
without it, in one run.

    .venv/bin/python bench/observability_overhead.py [-n 500] [--rounds 10] [--no-log]

In process (httpx.ASGITransport, no sockets): `GET /v1/models` (the cheapest route through the whole
middleware stack) N times sequentially per phase, alternating phases: the app as built (with
ObservabilityMiddleware, request log at INFO into a discarded JSON handler) and the same app with
the middleware removed (the baseline). Reports the median CPU microseconds per request per phase
(process time, which other load on a shared machine disturbs far less than wall time) and the
difference. Bounded by N and --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegate.app import create_app
from imagegate.observability.logs import JsonFormatter
from imagegate.observability.middleware import ObservabilityMiddleware
from imagegate.settings import load_settings


async def phase(app: object, n: int, stop_at: float) -> float:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        started = time.process_time()  # CPU time: far less disturbed by other load on a shared machine
        done = 0
        for _ in range(n):
            if time.monotonic() > stop_at:
                break
            response = await client.get("/v1/models")
            assert response.status_code == 200
            done += 1
        return (time.process_time() - started) / max(1, done) * 1e6


async def run(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(open("/dev/null", "w"))  # noqa: SIM115
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    logging.getLogger("imagegate.requests").setLevel(logging.WARNING if args.no_log else logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the benchmark's own client: not the gateway's cost
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(None, storage={"path": tmp})
        observed = create_app(settings)
        bare = create_app(settings)
        bare.user_middleware = [m for m in bare.user_middleware if m.cls is not ObservabilityMiddleware]
        stop_at = time.monotonic() + args.max_seconds
        results: dict[str, list[float]] = {"with": [], "without": []}
        await phase(observed, 200, stop_at)  # warm-up
        await phase(bare, 200, stop_at)
        for _ in range(args.rounds):
            results["with"].append(await phase(observed, args.n, stop_at))
            results["without"].append(await phase(bare, args.n, stop_at))
    with_us, without_us = statistics.median(results["with"]), statistics.median(results["without"])
    print(f"with observability    {with_us:7.1f} CPU us/request  {[round(x) for x in results['with']]}")
    print(f"without (baseline)    {without_us:7.1f} CPU us/request  {[round(x) for x in results['without']]}")
    print(f"overhead              {with_us - without_us:7.1f} CPU us/request ({with_us / without_us - 1:+.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=90)
    parser.add_argument("--no-log", action="store_true", help="metrics only: the request log below its level")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
