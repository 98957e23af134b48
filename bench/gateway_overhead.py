"""What the gateway costs on top of the provider protocol it drives.

A FakeFal (instant scenario: COMPLETED on the first status poll) and the gateway (fal pointed at
the fake, URL passthrough) each run under uvicorn on 127.0.0.1 (tests.fakes.server.LocalServer).
One httpx.AsyncClient then sends N requests at concurrency C in three phases:

  baseline  fal's queue protocol driven directly against the fake: submit -> status -> result ->
            download the image (the payload is the one the gateway would send, from a dry run)
  url       POST /v1/images/generations, qwen-image, response_format=url; with url_mode=passthrough
            the gateway answers with fal's own URL (no download, no re-encode); the client then
            downloads that URL, so every phase ends with the image bytes in hand
            (--url-no-download to skip that step)
  b64_webp  the same with response_format=b64_json + output_format=webp: the gateway downloads
            fal's PNG and converts it to WebP in its image pool

It reports p50/p95 latency and throughput per phase and the ratios against the baseline measured
in the same run. Each phase is bounded by --requests and --phase-seconds; every request by
--request-timeout. Nothing leaves 127.0.0.1.

    .venv/bin/python bench/gateway_overhead.py                       # ~15 s
    .venv/bin/python bench/gateway_overhead.py --isolation process   # fake and gateway in own processes
    .venv/bin/python bench/gateway_overhead.py --requests 3000 --phase-seconds 120 --rounds 3

The fake's idle keep-alive timeout is 75 s (--fake-keepalive; nginx's default), not uvicorn's 5 s:
see bench/README.md for what happens with 5 s.

--isolation thread (default) runs both servers as threads of this process, so client, fake and
gateway share one GIL: the ratio then approximates the gateway's total CPU per request.
--isolation process gives each its own interpreter, closer to a deployment (2 cores are still
shared by three processes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from bench._common import (
    FAL_KEY,
    fal_gateway_settings,
    fmt_ms,
    machine_line,
    percentile,
    ratio,
)

MODEL = "qwen-image"
PROMPT = "a lighthouse at dusk"
PHASES = ("baseline", "url", "b64_webp")
CHILD_LIFETIME = 900.0  # server processes exit by themselves after this many seconds at the latest


# ------------------------------------------------------------------------------------------------
# Servers


def _serve_fake(conn: Any, stop: Any, keepalive: float) -> None:
    """Child process: FakeFal under LocalServer until `stop` is set (or CHILD_LIFETIME passes)."""
    from tests.fakes.fal import FakeFal, FalScenario
    from tests.fakes.server import LocalServer

    fake = FakeFal(key=FAL_KEY, scenario=FalScenario.instant())
    with LocalServer(fake.app, timeout_keep_alive=keepalive) as srv:
        conn.send(srv.url)
        stop.wait(CHILD_LIFETIME)


def _serve_gateway(conn: Any, stop: Any, storage_dir: str, fal_url: str, poll_interval: float) -> None:
    """Child process: the gateway under LocalServer until `stop` is set (or CHILD_LIFETIME passes)."""
    from tests.fakes.server import LocalServer

    from imagegate.app import create_app

    app = create_app(fal_gateway_settings(storage_dir, fal_url, poll_interval=poll_interval))
    with LocalServer(app) as srv:
        conn.send(srv.url)
        stop.wait(CHILD_LIFETIME)


@contextlib.contextmanager
def servers(isolation: str, storage_dir: str, poll_interval: float, fake_keepalive: float
            ) -> Iterator[tuple[str, str, Any, int | None]]:
    """(fal_url, gateway_url, fake-or-None, gateway pid with --isolation process) with both servers
    running. `fake_keepalive` is the fake's idle keep-alive timeout (uvicorn's timeout_keep_alive;
    uvicorn's default is 5 s)."""
    if isolation == "thread":
        from tests.fakes.fal import FakeFal, FalScenario
        from tests.fakes.server import LocalServer

        from imagegate.app import create_app

        fake = FakeFal(key=FAL_KEY, scenario=FalScenario.instant())
        with LocalServer(fake.app, timeout_keep_alive=fake_keepalive) as fal_srv:
            app = create_app(fal_gateway_settings(storage_dir, fal_srv.url, poll_interval=poll_interval))
            with LocalServer(app) as gw_srv:
                yield fal_srv.url, gw_srv.url, fake, None
        return

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs: list[Any] = []
    try:
        fal_recv, fal_send = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=_serve_fake, args=(fal_send, stop, fake_keepalive), daemon=True))
        procs[-1].start()
        if not fal_recv.poll(30):
            raise RuntimeError("the fake fal process did not start")
        fal_url = fal_recv.recv()
        gw_recv, gw_send = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=_serve_gateway, args=(gw_send, stop, storage_dir, fal_url, poll_interval),
                                 daemon=True))
        procs[-1].start()
        if not gw_recv.poll(30):
            raise RuntimeError("the gateway process did not start")
        yield fal_url, gw_recv.recv(), None, procs[-1].pid
    finally:
        stop.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()  # only the processes started above
                proc.join(5)


# ------------------------------------------------------------------------------------------------
# One request per phase


AUTH = {"Authorization": f"Key {FAL_KEY}"}


def _ok(response: httpx.Response) -> httpx.Response:
    """raise_for_status with the body (the gateway's error envelope) in the message."""
    if response.is_error:
        raise RuntimeError(f"{response.request.method} {response.request.url.path} -> {response.status_code} "
                           f"{response.text[:400]}")
    return response


def baseline_request(client: httpx.AsyncClient, fal_url: str, endpoint: str, payload: dict[str, Any],
                     poll_interval: float) -> Callable[[], Awaitable[int]]:
    async def once() -> int:
        submitted = await client.post(f"{fal_url}/{endpoint}", json=payload, headers=AUTH)
        submitted.raise_for_status()
        handle = submitted.json()
        for _ in range(1000):  # the instant scenario completes on the first poll
            status = await client.get(handle["status_url"], headers=AUTH)
            if status.json()["status"] == "COMPLETED":
                break
            await asyncio.sleep(poll_interval)
        else:
            raise RuntimeError("fake fal never completed")
        result = await client.get(handle["response_url"], headers=AUTH)
        result.raise_for_status()
        image = await client.get(result.json()["images"][0]["url"])
        image.raise_for_status()
        return len(image.content)

    return once


def gateway_url_request(client: httpx.AsyncClient, gw_url: str, fal_url: str, download: bool
                        ) -> Callable[[], Awaitable[int]]:
    body = {"model": MODEL, "prompt": PROMPT, "response_format": "url"}

    async def once() -> int:
        response = _ok(await client.post(f"{gw_url}/v1/images/generations", json=body))
        url = response.json()["data"][0]["url"]
        if not url.startswith(fal_url):
            raise RuntimeError(f"expected fal's own URL (passthrough), got {url}")
        if not download:
            return 0
        image = await client.get(url)
        image.raise_for_status()
        return len(image.content)

    return once


def gateway_b64_request(client: httpx.AsyncClient, gw_url: str) -> Callable[[], Awaitable[int]]:
    body = {"model": MODEL, "prompt": PROMPT, "response_format": "b64_json", "output_format": "webp"}

    async def once() -> int:
        response = _ok(await client.post(f"{gw_url}/v1/images/generations", json=body))
        data = base64.b64decode(response.json()["data"][0]["b64_json"])
        if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
            raise RuntimeError("expected WebP bytes")
        return len(data)

    return once


# ------------------------------------------------------------------------------------------------
# The load loop


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    stopped_by_time: bool = False
    gateway_cpu: float | None = None  # seconds of the gateway process's CPU (--isolation process)

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)


async def run_phase(name: str, once: Callable[[], Awaitable[int]], *, requests: int, concurrency: int,
                    max_seconds: float, request_timeout: float) -> Phase:
    """`requests` calls of `once`, `concurrency` at a time; stops early after `max_seconds`."""
    phase = Phase(name)
    issued = 0
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker() -> None:
        nonlocal issued
        while issued < requests:
            if time.perf_counter() >= deadline:
                phase.stopped_by_time = True
                return
            issued += 1
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(request_timeout):
                    await once()
            except Exception as exc:  # recorded and reported; the run is marked invalid
                phase.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            phase.latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    phase.elapsed = time.perf_counter() - start
    return phase


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    from bench.inflight import proc_cpu

    return proc_cpu(pid)


async def measure(args: argparse.Namespace, fal_url: str, gw_url: str, fake: Any, gw_pid: int | None
                  ) -> list[list[Phase]]:
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=args.request_timeout) as client:
        dry = await client.post(f"{gw_url}/v1/images/generations", headers={"x-imagegate-dry-run": "1"},
                                json={"model": MODEL, "prompt": PROMPT, "response_format": "url"})
        dry.raise_for_status()
        plan = dry.json()
        endpoint, payload = plan["upstream_model"], plan["payloads"][0]
        print(f"baseline payload (from the gateway's dry run): POST /{endpoint} {json.dumps(payload)}")
        makers: dict[str, Callable[[], Awaitable[int]]] = {
            "baseline": baseline_request(client, fal_url, endpoint, payload, args.poll_interval),
            "url": gateway_url_request(client, gw_url, fal_url, download=not args.url_no_download),
            "b64_webp": gateway_b64_request(client, gw_url),
        }
        rounds: list[list[Phase]] = []
        for number in range(args.rounds):
            phases = []
            for name, once in makers.items():
                if name not in args.phases:
                    continue
                if fake is not None:
                    fake.reset()  # keep the fake's recordings from growing across phases
                await run_phase(name, once, requests=args.warmup, concurrency=args.concurrency,
                                max_seconds=args.phase_seconds, request_timeout=args.request_timeout)
                cpu0 = _cpu(gw_pid)
                phase = await run_phase(name, once, requests=args.requests, concurrency=args.concurrency,
                                        max_seconds=args.phase_seconds, request_timeout=args.request_timeout)
                if gw_pid is not None:
                    phase.gateway_cpu = _cpu(gw_pid) - cpu0
                phases.append(phase)
                print(f"  round {number + 1} {name:9s} {len(phase.latencies)} ok, {len(phase.errors)} errors, "
                      f"{phase.elapsed:.1f} s")
            rounds.append(phases)
        return rounds


def report(rounds: list[list[Phase]], args: argparse.Namespace) -> bool:
    print()
    print(f"gateway_overhead: {machine_line()}; isolation={args.isolation}, C={args.concurrency}, "
          f"N={args.requests}, rounds={args.rounds}")
    ok = True
    header = (f"{'phase':10s} {'ok':>5s} {'p50':>10s} {'p95':>10s} {'req/s':>8s}   "
              f"{'p50 x':>6s} {'p95 x':>6s} {'req/s x':>7s}")
    for number, phases in enumerate(rounds, 1):
        print(f"round {number}  (x = ratio to {phases[0].name}; req/s x < 1 means fewer requests per second)")
        print(header)
        base = phases[0]
        for phase in phases:
            print(f"{phase.name:10s} {len(phase.latencies):5d} {fmt_ms(phase.p(50)):>10s} "
                  f"{fmt_ms(phase.p(95)):>10s} {phase.throughput:8.1f}   {ratio(phase.p(50), base.p(50)):6.2f} "
                  f"{ratio(phase.p(95), base.p(95)):6.2f} {ratio(phase.throughput, base.throughput):7.2f}"
                  + (f"   added p50 {1000 * (phase.p(50) - base.p(50)):+.2f} ms" if phase is not base else "")
                  + (f"   gateway CPU {1000 * phase.gateway_cpu / max(1, len(phase.latencies)):.2f} ms/req"
                     if phase.gateway_cpu is not None else ""))
            if phase.errors:
                rate = len(phase.errors) / (len(phase.errors) + len(phase.latencies))
                ok = ok and rate <= args.max_error_rate
                kinds = Counter(error.split(" {")[0] for error in phase.errors)
                print(f"    {len(phase.errors)} errors ({100 * rate:.1f}%), first: {phase.errors[0]}")
                for kind, count in kinds.most_common(3):
                    print(f"      {count} x {kind}")
            if phase.stopped_by_time:
                print(f"    stopped by --phase-seconds={args.phase_seconds} after {len(phase.latencies)} requests")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", "-n", type=int, default=300, help="requests per phase (default 300)")
    parser.add_argument("--concurrency", "-c", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--warmup", type=int, default=32, help="unmeasured requests before each phase (default 32)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all three phases (default 1)")
    parser.add_argument("--phase-seconds", type=float, default=15.0, help="time limit per phase (default 15)")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--poll-interval", type=float, default=0.005, help="fal poll interval, both sides")
    parser.add_argument("--isolation", choices=("thread", "process"), default="thread")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="phases to run; ratios are against the first one listed (default: all three)")
    parser.add_argument("--max-error-rate", type=float, default=0.01,
                        help="exit 1 when a phase fails more often than this (default 0.01)")
    parser.add_argument("--fake-keepalive", type=float, default=75.0,
                        help="the fake fal's idle keep-alive timeout in seconds (default 75, nginx's "
                             "default; uvicorn's own default of 5 makes ~0.3-1%% of gateway requests "
                             "fail on reused connections, see bench/README.md)")
    parser.add_argument("--url-no-download", action="store_true",
                        help="url phase: do not download the returned URL")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="imagegate-bench-") as storage_dir,
        servers(args.isolation, storage_dir, args.poll_interval, args.fake_keepalive) as (fal_url, gw_url, fake, pid),
    ):
        rounds = asyncio.run(measure(args, fal_url, gw_url, fake, pid))
    return 0 if report(rounds, args) else 1


if __name__ == "__main__":
    raise SystemExit(main())
