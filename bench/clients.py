"""Upstream HTTP client candidates, measured on the gateway's two workloads against the lean fake fal
(tests.fakes.lean_fal, its own process):

  seq    one request at a time (N x GET status_url, keep-alive): CPU per request of this process,
         the latency workload's upstream share
  burst  K requests started at once (GET status_url), one client: wall and CPU, the in-flight
         workload's upstream share (each request is a fal status poll)

Candidates (all behind the same call: `await client.get(url, headers=...)` + read the body):

  httpx-httpcore   httpx.AsyncClient as it comes (httpcore 1.0's AsyncConnectionPool)
  httpx-flat       httpx.AsyncClient on imagegate.upstream_http.UpstreamTransport (FlatConnectionPool)
  httpx-aiohttp    httpx.AsyncClient on httpx_aiohttp.AiohttpTransport (aiohttp's connector and parser)
  aiohttp          aiohttp.ClientSession directly (not the httpx API; reference)
  httpx2           httpx2.AsyncClient (httpcore2's pool; not the httpx API; reference)
  imagegate        imagegate.upstream_http.upstream_client(): httpx's API, plain calls straight to
                   imagegate.upstream_wire (asyncio protocols, llhttp, a pool per origin)
  pyreqwest        pyreqwest's Client (Rust reqwest/hyper on its own threads; not the httpx API)
  rnet             rnet's Client (Rust, on its own threads; not the httpx API)

Candidates whose package is not installed are skipped (`pip install httpx-aiohttp aiohttp pyreqwest
rnet` for those; httpx2 comes with the openai SDK of the test extra). Besides the process's CPU per
request, the CPU of its main thread (the event loop's) is reported: the Rust clients do part of
their work on threads of their own.

    .venv/bin/python bench/clients.py                 # ~1 min
    .venv/bin/python bench/clients.py --burst 3000 --seq 2000 --only httpx-flat httpx-aiohttp
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import FAL_KEY, machine_line
from bench.inflight_burst import Conn, _serve_fake, child, raise_nofile

LIMITS = dict(max_connections=1000, max_keepalive_connections=1000, keepalive_expiry=4)
HEADERS = {"Authorization": f"Key {FAL_KEY}", "Accept": "application/json"}

Get = Callable[[str], Awaitable[int]]


async def make(name: str) -> tuple[Get, Callable[[], Awaitable[None]]]:
    import httpx

    if name.startswith("httpx-"):
        limits = httpx.Limits(**LIMITS)  # type: ignore[arg-type]
        if name == "httpx-httpcore":
            client = httpx.AsyncClient(limits=limits, timeout=60)
        elif name == "httpx-flat":
            from bench.flat_pool import upstream_client

            client = upstream_client(limits=limits, timeout=httpx.Timeout(60))
        else:
            import aiohttp
            from httpx_aiohttp import AiohttpTransport

            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1000, limit_per_host=1000, keepalive_timeout=4)
            )
            client = httpx.AsyncClient(transport=AiohttpTransport(client=session), timeout=60)

        async def get(url: str) -> int:
            response = await client.get(url, headers=HEADERS)
            return len(response.content)

        return get, client.aclose
    if name == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, limit_per_host=1000, keepalive_timeout=4),
            timeout=aiohttp.ClientTimeout(total=60),
        )

        async def aget(url: str) -> int:
            async with session.get(url, headers=HEADERS) as response:
                return len(await response.read())

        return aget, session.close
    if name == "imagegate":
        from imagegate.upstream_http import upstream_client

        ours = upstream_client(limits=httpx.Limits(**LIMITS), timeout=httpx.Timeout(60))  # type: ignore[arg-type]

        async def oget(url: str) -> int:
            response = await ours.get(url, headers=HEADERS)
            return len(response.content)

        return oget, ours.aclose
    if name == "pyreqwest":
        from pyreqwest.client import ClientBuilder

        rq = ClientBuilder().max_connections(1000).build()

        async def rqget(url: str) -> int:
            response = await rq.get(url).headers(HEADERS).build().send()
            return len(await response.bytes())

        return rqget, rq.close
    if name == "rnet":
        import rnet

        rn = rnet.Client()

        async def rnget(url: str) -> int:
            response = await rn.get(url, headers=HEADERS)
            return len(await response.bytes())

        async def rnclose() -> None:
            return None

        return rnget, rnclose
    if name == "httpx2":
        import httpx2

        client2 = httpx2.AsyncClient(limits=httpx2.Limits(**LIMITS), timeout=60)  # type: ignore[arg-type]

        async def get2(url: str) -> int:
            response = await client2.get(url, headers=HEADERS)
            return len(response.content)

        return get2, client2.aclose
    raise ValueError(name)


CANDIDATES = {
    "httpx-httpcore": "httpx",
    "httpx-flat": "httpx",
    "httpx-aiohttp": "httpx_aiohttp",
    "aiohttp": "aiohttp",
    "httpx2": "httpx2",
    "imagegate": "imagegate",
    "pyreqwest": "pyreqwest",
    "rnet": "rnet",
}


async def status_url(fal_url: str) -> str:
    conn = await Conn.open(fal_url)
    try:
        _, body = await conn.request("POST", "/fal-ai/qwen-image", b"{}", f"authorization: Key {FAL_KEY}\r\n")
    finally:
        conn.close()
    import json

    return str(json.loads(body)["status_url"])


async def measure(args: argparse.Namespace, fal_url: str) -> list[dict[str, Any]]:
    raise_nofile()
    url = await status_url(fal_url)
    rows = []
    for name in args.only or CANDIDATES:
        if importlib.util.find_spec(CANDIDATES[name]) is None:
            print(f"  {name}: not installed, skipped")
            continue
        row: dict[str, Any] = {"name": name}
        get, close = await make(name)
        try:
            for _ in range(50):  # warm-up: connection open, imports
                await get(url)
            cpu0, t0, main0 = time.process_time(), time.perf_counter(), time.thread_time()
            for _ in range(args.seq):
                await get(url)
            row["seq_us"] = 1e6 * (time.process_time() - cpu0) / args.seq
            row["seq_main_us"] = 1e6 * (time.thread_time() - main0) / args.seq
            row["seq_wall_us"] = 1e6 * (time.perf_counter() - t0) / args.seq
            cpu0, t0 = time.process_time(), time.perf_counter()
            try:
                async with asyncio.timeout(args.burst_seconds):
                    await asyncio.gather(*(get(url) for _ in range(args.burst)))
                row["burst_wall"] = time.perf_counter() - t0
            except TimeoutError:
                row["burst_wall"] = float("inf")
            row["burst_cpu_ms"] = 1000 * (time.process_time() - cpu0) / args.burst
        finally:
            await close()
        print(f"  {name}: {row}", flush=True)
        rows.append(row)
        await asyncio.sleep(1)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=2000)
    parser.add_argument("--burst", type=int, default=3000)
    parser.add_argument("--burst-seconds", type=float, default=60)
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES))
    args = parser.parse_args(argv)
    with child(_serve_fake, 0.0, what="fake fal") as (fal_url, _):
        rows = asyncio.run(measure(args, fal_url))
    print()
    print(f"clients: {machine_line()}; seq N={args.seq}, burst K={args.burst}")
    print(
        f"{'candidate':16s} {'seq CPU/req':>12s} {'of it loop':>11s} {'seq wall/req':>13s} {'burst wall':>11s} "
        f"{'burst CPU/req':>14s}"
    )
    for row in rows:
        print(
            f"{row['name']:16s} {row['seq_us']:9.0f} us {row['seq_main_us']:8.0f} us {row['seq_wall_us']:10.0f} us "
            f"{row['burst_wall']:10.2f}s {row['burst_cpu_ms']:11.2f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
