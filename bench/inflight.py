"""Thousands of requests in flight, most of them waiting on a model: does the gateway scale?

The requirement: "thousands of requests may be in flight at once, most of them waiting on a
model: avoid polling storms, keep per-request memory small, reuse connections, never block the
event loop". This script puts numbers on each clause.

Three processes on 127.0.0.1:

  fake     tests.fakes.fal.FakeFal under uvicorn in its own process (so its CPU does not count
           as the gateway's). Each job waits --queue-polls x IN_QUEUE, then --progress-polls x
           IN_PROGRESS status ticks before COMPLETED (default 1 + 3: the 5th status poll
           completes, ~4.6 s with the default poll schedule). A small control endpoint
           (/__bench/...) in front of the fake resets it, switches the scenario and reports what
           it received: submits, status polls, stream opens, result fetches, the distinct client
           ports (= TCP connections opened to it) and the busiest 100 ms of status polls. The
           output PNG is rendered once and memoized, so the fake's encode does not slow down the
           burst of result fetches.
  gateway  the real create_app(...) with fal pointed at the fake (URL passthrough), wrapped by
           bench_gateway_app() in this file (src/ is not touched), under uvicorn in its own
           process, a FRESH process per rung, with the real polling defaults (poll_interval 0.5 s
           growing x1.5 to poll_max_interval 3 s) unless flags say otherwise. The wrapper starts a
           ticker task in the app's lifespan that sleeps 10 ms at a time and records how late
           each wake-up is (event-loop lag) and the number of asyncio tasks; it also times the
           garbage collector. GET /__bench/probe reads and resets all of it.
  bench    this process: fires K concurrent POST /v1/images/generations (qwen-image,
           response_format=url) and, from a sampler thread, reads the gateway's
           /proc/<pid>/status (VmRSS, Threads) and /proc/<pid>/net/tcp (sockets ESTABLISHED to
           the fake's port: only the gateway connects there during a rung).

Per rung (K in --ladder, default 100 500 1000; --with-2000 adds 2000), after --warmup instant
requests on the fresh gateway:

  ok, wall       every request answered 200 with fal's own URL? time until the last answer
  RSS            before / peak / after (after --settle s), and (peak - before) / K in KiB
  CPU            the gateway's user+sys CPU per request and per HTTP exchange (K downstream +
                 every upstream request), and cores used (CPU / wall); the fake's and this
                 process's CPU, to see who was busy on the 2 cores
  upstream       requests/s the fake received (all kinds) and status polls/s; polls per job;
                 peak polls/s in the busiest 100 ms (a storm shows as peak >> mean)
  connections    peak ESTABLISHED gateway->fake sockets, and connections opened during the rung
                 (distinct client ports the fake saw); opened >> peak means churn
  loop lag       max / p99 / mean lateness of the 10 ms ticker inside the gateway; GC time
  tasks          peak asyncio tasks in the gateway, per in-flight request

Ratios are against the first rung (K=100) of the same run: per-request RSS, CPU per request and
polls per job should stay ~1 if the gateway scales.

Then the SSE comparison at --stream-k (default 1000, the largest default rung): the same rung
with providers.fal.status_stream=true. The fake's stream interval is set so a job lasts as long
as it did under polling at the first rung (p50 latency / status ticks), i.e. the same model run
time; reported: upstream requests/s and per job, CPU per request, connections, stream/poll.

    .venv/bin/python bench/inflight.py                   # ~80 s
    .venv/bin/python bench/inflight.py --with-2000       # adds K=2000 (~+50 s)
    .venv/bin/python bench/inflight.py --queue-polls 2 --progress-polls 4    # longer jobs, ~130 s
    .venv/bin/python bench/inflight.py --ladder 100 1000 --no-stream --profile /tmp/prof

--profile DIR writes a cProfile of the gateway's event-loop thread per rung (it slows the
gateway ~2x). --what-if-linear-pool is a diagnostic, not the gateway as shipped: it replaces
httpcore's connection-pool assignment in the gateway's process by a one-pass version.

Bounded: each rung sends exactly K requests (each with --request-timeout) and is abandoned after
--rung-seconds; server processes exit by themselves after CHILD_LIFETIME. Exit status 1 if any
request of any rung failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import multiprocessing as mp
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from bench._common import FAL_KEY, fal_gateway_settings, machine_line, percentile, ratio

MODEL = "qwen-image"
PROMPT = "a lighthouse at dusk"
CHILD_LIFETIME = 900.0  # server processes exit by themselves after this many seconds at the latest
TICK = 0.010  # the gateway-side ticker's sleep
TASK_SAMPLE_EVERY = 10  # ticks between asyncio task counts (all_tasks() is O(tasks))
MAX_LAG_SAMPLES = 100_000  # bounded memory for the ticker (~16 min at 10 ms)
CONTROL = "/__bench/"
WHAT_IF_NOTE = "; WHAT-IF: httpcore pool assignment patched (not the gateway as shipped)"


# ------------------------------------------------------------------------------------------------
# The fake fal process: FakeFal behind a control endpoint


def _fake_app(keepalive_interval: float) -> Any:
    """FakeFal wrapped so /__bench/* is handled here and every other request's client port is
    recorded. Runs in the fake's process."""
    import functools
    import json

    import tests.fakes.fal as fal_module
    from tests.fakes import images as fake_images
    from tests.fakes.fal import FakeFal, FalScenario

    # The output PNG only depends on format, size and seed: render it once, not once per job
    # (13 ms of the fake's CPU each, all at the same moment when K jobs complete together).
    setattr(fal_module, "image_bytes", functools.lru_cache(maxsize=16)(fake_images.image_bytes))  # noqa: B010

    fake = FakeFal(key=FAL_KEY, scenario=FalScenario.instant())
    ports: set[int] = set()

    def stats() -> dict[str, Any]:
        with fake._lock:  # the fake's own lock: its handlers append under it
            requests = list(fake.requests)
            polls = list(fake.status_polls)
            jobs = list(fake.submits)
            stream_opens = len(fake.stream_opens)
            result_fetches = len(fake.result_fetches)
            cancels = len(fake.cancels)
        poll_times = [r.at for r in requests if r.method == "GET" and r.path.endswith("/status")]
        peak = 0
        if poll_times:
            first = min(poll_times)
            bins = Counter(int((t - first) / 0.1) for t in poll_times)
            peak = max(bins.values())
        per_job = Counter(polls)
        ticks = sorted(job.polls for job in jobs)  # status polls + SSE ticks consumed per job
        times = [r.at for r in requests]
        return {
            "requests": len(requests),
            "submits": len(jobs),
            "status_polls": len(polls),
            "stream_opens": stream_opens,
            "result_fetches": result_fetches,
            "cancels": cancels,
            "client_ports": len(ports),
            "peak_polls_100ms": peak,
            "polls_per_job_max": max(per_job.values(), default=0),
            "ticks_per_job_min": ticks[0] if ticks else 0,
            "ticks_per_job_max": ticks[-1] if ticks else 0,
            "span": (max(times) - min(times)) if times else 0.0,
        }

    async def control(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        name = scope["path"][len(CONTROL) :]
        if name == "setup":  # {"queue_polls", "progress_polls", "stream_interval"} or {} for instant
            spec = json.loads(body or b"{}")
            if spec:
                fake.scenario = FalScenario(
                    queue_polls=spec["queue_polls"],
                    progress_polls=spec["progress_polls"],
                    stream_interval=spec.get("stream_interval", 0.02),
                    keepalive_interval=keepalive_interval,
                )
            else:
                fake.scenario = FalScenario.instant()
            fake.reset()
            ports.clear()
            answer: Any = {"ok": True}
        elif name == "stats":
            answer = stats()
        else:
            answer = {"error": "unknown"}
        data = json.dumps(answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data})

    class App:
        state = fake.app.state  # LocalServer's on_start/on_stop hooks

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                if scope["path"].startswith(CONTROL):
                    return await control(scope, receive, send)
                client = scope.get("client")
                if client:
                    ports.add(client[1])
            await fake.app(scope, receive, send)

    return App()


def _serve_fake(conn: Any, stop: Any, keepalive: float, backlog: int) -> None:
    from tests.fakes.server import LocalServer

    with LocalServer(_fake_app(keepalive_interval=0.1), timeout_keep_alive=keepalive, backlog=backlog) as srv:
        conn.send(srv.url)
        stop.wait(CHILD_LIFETIME)


# ------------------------------------------------------------------------------------------------
# The gateway process: create_app behind a lag probe


class LagProbe:
    """ASGI wrapper around the gateway: a ticker task started in the app's lifespan records how
    late each 10 ms sleep wakes up, and how many asyncio tasks exist; GET /__bench/probe answers
    (and resets) both. Everything else goes to the gateway unchanged."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.state
        self.lags: list[float] = []
        self.peak_tasks = 0
        self._task: asyncio.Task[None] | None = None
        self.gc_seconds = 0.0  # time inside the garbage collector (any thread), and collections by generation
        self.gc_collections = [0, 0, 0]
        self.gc_max_pause = 0.0
        self._gc_start = 0.0
        self._profile: Any = None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            pause = time.perf_counter() - self._gc_start
            self.gc_seconds += pause
            self.gc_max_pause = max(self.gc_max_pause, pause)
            self.gc_collections[info["generation"]] += 1

    async def _tick(self) -> None:
        n = 0
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(TICK)
            if len(self.lags) < MAX_LAG_SAMPLES:
                self.lags.append(max(0.0, time.perf_counter() - t0 - TICK))
            n += 1
            if n % TASK_SAMPLE_EVERY == 0:
                self.peak_tasks = max(self.peak_tasks, len(asyncio.all_tasks()))

    def _probe(self) -> dict[str, Any]:
        lags, self.lags = self.lags, []
        tasks = len(asyncio.all_tasks())
        peak, self.peak_tasks = max(self.peak_tasks, tasks), tasks
        gc_seconds, gc_collections, gc_max_pause = self.gc_seconds, self.gc_collections, self.gc_max_pause
        self.gc_seconds, self.gc_collections, self.gc_max_pause = 0.0, [0, 0, 0], 0.0
        return {
            "gc_seconds": gc_seconds,
            "gc_max_pause": gc_max_pause,
            "gc_collections": gc_collections,
            "ticks": len(lags),
            "max": max(lags, default=0.0),
            "p99": percentile(lags, 99) if lags else 0.0,
            "mean": sum(lags) / len(lags) if lags else 0.0,
            "tasks": tasks,
            "peak_tasks": peak,
        }

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":

            async def lifespan_receive() -> Any:
                message = await receive()
                if message["type"] == "lifespan.startup" and self._task is None:
                    self._task = asyncio.get_running_loop().create_task(self._tick())
                elif message["type"] == "lifespan.shutdown" and self._task is not None:
                    self._task.cancel()
                return message

            await self.app(scope, lifespan_receive, send)
            return
        if scope["type"] == "http" and scope["path"] in (CONTROL + "probe", CONTROL + "profile"):
            import json

            if scope["path"] == CONTROL + "probe":
                answer = self._probe()
            else:  # ?start, or ?dump=<path>: cProfile of the loop thread (this handler runs on it)
                answer = self._profiling(scope["query_string"].decode())
            data = json.dumps(answer).encode()
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": data})
            return
        await self.app(scope, receive, send)

    def _profiling(self, query: str) -> dict[str, Any]:
        import cProfile
        from urllib.parse import parse_qs

        params = parse_qs(query, keep_blank_values=True)
        if "start" in params:
            self._profile = cProfile.Profile()
            self._profile.enable()  # this thread only: the event loop's
        elif "dump" in params and self._profile is not None:
            self._profile.disable()
            self._profile.dump_stats(params["dump"][0])
            self._profile = None
        return {"ok": True}


def linear_pool_patch() -> None:
    """DIAGNOSTIC ONLY (--what-if-linear-pool), in the gateway's process: replace httpcore's
    AsyncConnectionPool._assign_requests_to_connections (httpcore 1.0.x) with a one-pass version
    that hands each idle HTTP/1.1 connection to ONE queued request and keeps the idle-connection
    count right, as in encode/httpcore#1035 and pydantic/httpx2#974/#1075. It shows how much of
    the gateway's cost at high K is the pool's; it is not a fix for the gateway."""
    from httpcore._async.connection_pool import AsyncConnectionPool

    def assign(self: Any) -> list[Any]:
        closing: list[Any] = []
        reserved = {id(r.connection) for r in self._requests if r.connection is not None}
        idle = sum(1 for c in self._connections if c.is_idle() and id(c) not in reserved)
        for connection in list(self._connections):
            if connection.is_closed():
                self._connections.remove(connection)
            elif id(connection) in reserved:
                continue
            elif connection.has_expired():
                idle -= connection.is_idle()
                self._connections.remove(connection)
                closing.append(connection)
            elif connection.is_idle() and idle > self._max_keepalive_connections:
                idle -= 1
                self._connections.remove(connection)
                closing.append(connection)
        queued = [r for r in self._requests if r.is_queued()]
        if not queued:
            return closing
        free = [c for c in self._connections if id(c) not in reserved and c.is_available()]
        spare = [c for c in self._connections if id(c) not in reserved and c.is_idle()]
        for request in queued:
            origin = request.request.url.origin
            index = next((i for i, c in enumerate(free) if c.can_handle_request(origin)), None)
            if index is not None:
                connection = free.pop(index)
                if connection in spare:
                    spare.remove(connection)
            elif len(self._connections) < self._max_connections:
                connection = self.create_connection(origin)
                self._connections.append(connection)
            elif spare:
                victim = spare.pop(0)
                self._connections.remove(victim)
                closing.append(victim)
                connection = self.create_connection(origin)
                self._connections.append(connection)
            else:
                continue
            request.assign_to_connection(connection)
        return closing

    AsyncConnectionPool._assign_requests_to_connections = assign  # type: ignore[method-assign]


def bench_gateway_app(
    storage_dir: str,
    fal_url: str,
    *,
    poll_interval: float,
    poll_max_interval: float,
    status_stream: bool,
    deadline: float,
) -> LagProbe:
    """The benchmark's app factory: the real create_app, wrapped in the lag probe."""
    from imagegate.app import create_app

    settings = fal_gateway_settings(
        storage_dir,
        fal_url,
        poll_interval=poll_interval,
        poll_max_interval=poll_max_interval,
        status_stream=status_stream,
        deadline_seconds=deadline,
    )
    return LagProbe(create_app(settings))


def _serve_gateway(
    conn: Any, stop: Any, storage_dir: str, fal_url: str, options: dict[str, Any], backlog: int, linear_pool: bool
) -> None:
    from tests.fakes.server import LocalServer

    if linear_pool:
        linear_pool_patch()
    app = bench_gateway_app(storage_dir, fal_url, **options)
    with LocalServer(app, backlog=backlog) as srv:
        conn.send(srv.url)
        stop.wait(CHILD_LIFETIME)


@contextlib.contextmanager
def child(target: Any, *args: Any, what: str) -> Iterator[tuple[str, int]]:
    """(url, pid) of a server process started with `target(conn, stop, *args)`; stopped on exit."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(send, stop, *args), daemon=True)
    proc.start()
    try:
        if not recv.poll(60):
            raise RuntimeError(f"the {what} process did not start")
        assert proc.pid is not None
        yield recv.recv(), proc.pid
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.terminate()  # only the process started here
            proc.join(5)


# ------------------------------------------------------------------------------------------------
# /proc readers (Linux)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (KiB) and Threads from /proc/<pid>/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "Threads:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sockets_to(pid: int, port: int) -> tuple[int, int]:
    """(ESTABLISHED TCP sockets whose remote port is `port`, TIME_WAIT sockets on either side of a
    connection to `port`) in the network namespace of `pid` (/proc/<pid>/net/tcp, IPv4).

    Only the gateway connects to the fake while a rung runs (the benchmark's control client does not
    keep connections), so the first number is the gateway's connections to the fake. Counted with a
    regular expression over the whole table, so sampling costs little even with thousands of sockets."""
    with open(f"/proc/{pid}/net/tcp") as f:
        table = f.read()
    hex_port = f"{port:04X}"
    established = table.count(f":{hex_port} 01 ")  # "<rem_address> <st>": remote port, state 01
    time_wait = table.count(f":{hex_port} 06 ") + len(
        re.findall(rf":{hex_port} [0-9A-F]{{8}}:[0-9A-F]{{4}} 06 ", table)
    )  # remote or local port, state 06
    return established, time_wait


class Sampler:
    """A thread reading the gateway's RSS, threads and sockets every `interval` s (bounded)."""

    def __init__(self, pid: int, fake_port: int, interval: float, max_seconds: float) -> None:
        self.pid, self.fake_port, self.interval, self.max_seconds = pid, fake_port, interval, max_seconds
        self.peak_rss = 0
        self.peak_threads = 0
        self.peak_established = 0
        self.peak_time_wait = 0
        self.time_wait_start = sockets_to(pid, fake_port)[1]  # left over from earlier rungs/processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inflight-sampler", daemon=True)

    def sample(self) -> None:
        status = proc_status(self.pid)
        self.peak_rss = max(self.peak_rss, status["VmRSS"])
        self.peak_threads = max(self.peak_threads, status["Threads"])
        established, time_wait = sockets_to(self.pid, self.fake_port)
        self.peak_established = max(self.peak_established, established)
        self.peak_time_wait = max(self.peak_time_wait, time_wait)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()


# ------------------------------------------------------------------------------------------------
# One rung


@dataclass
class Rung:
    k: int
    mode: str  # "poll" or "stream"
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    abandoned: bool = False
    rss_before: int = 0  # KiB
    rss_peak: int = 0
    rss_after: int = 0
    more_bursts: list[tuple[int, int]] = field(default_factory=list)  # (peak, after) of --bursts 2..N
    threads: int = 0
    cpu: float = 0.0  # gateway CPU seconds during the rung
    fake_cpu: float = 0.0
    bench_cpu: float = 0.0  # this process: the K clients and the sampler thread
    established_peak: int = 0
    established_after: int = 0
    time_wait_peak: int = 0  # new TIME_WAIT sockets to/from the fake during the rung
    lag: dict[str, Any] = field(default_factory=dict)
    fake: dict[str, Any] = field(default_factory=dict)
    stream_interval: float = 0.0

    @property
    def all_ok(self) -> bool:
        return self.ok == self.k and not self.errors and not self.abandoned

    @property
    def rss_per_request(self) -> float:  # KiB per in-flight request
        return (self.rss_peak - self.rss_before) / self.k

    @property
    def cpu_per_request(self) -> float:  # seconds
        return self.cpu / self.k

    @property
    def cpu_per_exchange(self) -> float:  # seconds per HTTP exchange: K downstream + every upstream request
        return ratio(self.cpu, self.k + self.fake["requests"])

    @property
    def upstream_per_s(self) -> float:
        return self.fake["requests"] / self.wall if self.wall else 0.0

    @property
    def polls_per_s(self) -> float:
        return self.fake["status_polls"] / self.wall if self.wall else 0.0

    @property
    def polls_per_job(self) -> float:
        return ratio(self.fake["status_polls"], self.fake["submits"])

    @property
    def upstream_per_job(self) -> float:
        return ratio(self.fake["requests"], self.fake["submits"])

    @property
    def peak_polls_per_s(self) -> float:
        return float(self.fake["peak_polls_100ms"]) * 10.0


async def fire(
    client: httpx.AsyncClient, gw_url: str, fal_url: str, k: int, max_seconds: float
) -> tuple[list[float], list[str], bool, float]:
    """K concurrent generations; (latencies of the successes, errors, abandoned?, wall time)."""
    body = {"model": MODEL, "prompt": PROMPT, "response_format": "url"}
    latencies: list[float] = []
    errors: list[str] = []

    async def once() -> None:
        t0 = time.perf_counter()
        try:
            response = await client.post(f"{gw_url}/v1/images/generations", json=body)
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code} {response.text[:200]}")
                return
            url = response.json()["data"][0]["url"]
            if not url.startswith(fal_url):
                errors.append(f"expected fal's own URL (passthrough), got {url[:80]}")
                return
        except Exception as exc:  # recorded and reported; the rung is marked failed
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    tasks = [asyncio.create_task(once()) for _ in range(k)]
    _, pending = await asyncio.wait(tasks, timeout=max_seconds)
    wall = time.perf_counter() - start
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return latencies, errors, bool(pending), wall


async def run_rung(
    args: argparse.Namespace, fal_url: str, fake_pid: int, k: int, *, mode: str, stream_interval: float = 0.02
) -> Rung:
    rung = Rung(k, mode, stream_interval=stream_interval)
    fake_port = httpx.URL(fal_url).port
    assert fake_port is not None
    options = {
        "poll_interval": args.poll_interval,
        "poll_max_interval": args.poll_max_interval,
        "status_stream": mode == "stream",
        "deadline": args.request_timeout,
    }
    backlog = max(2048, 2 * k)
    # No keep-alive on the load client: with K connections in one httpx pool, httpcore 1.0's idle-connection
    # bookkeeping is O(connections^2) per request and the client alone ate ~20 s of CPU at K=1000.
    limits = httpx.Limits(max_connections=k + 16, max_keepalive_connections=0)
    with (
        tempfile.TemporaryDirectory(prefix="imagegate-bench-") as storage_dir,
        child(_serve_gateway, storage_dir, fal_url, options, backlog, args.what_if_linear_pool, what="gateway") as (
            gw_url,
            gw_pid,
        ),
    ):
        async with (
            httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as control,
            httpx.AsyncClient(limits=limits, timeout=args.request_timeout) as client,
        ):

            async def setup(spec: dict[str, Any]) -> None:
                (await control.post(f"{fal_url}{CONTROL}setup", json=spec)).raise_for_status()

            await setup({})  # warm-up: instant jobs, so imports and first-use costs are paid
            if args.warmup:
                _, errors, _, _ = await fire(client, gw_url, fal_url, args.warmup, 30)
                if errors:
                    raise RuntimeError(f"warm-up failed: {errors[0]}")
            await setup(
                {
                    "queue_polls": args.queue_polls,
                    "progress_polls": args.progress_polls,
                    "stream_interval": stream_interval,
                }
            )
            await asyncio.sleep(0.2)
            idle = await control.get(f"{gw_url}{CONTROL}probe")  # also resets the lag record
            idle.raise_for_status()
            idle_tasks = idle.json()["tasks"]
            rung.rss_before = proc_status(gw_pid)["VmRSS"]
            cpu0, fake_cpu0, bench_cpu0 = proc_cpu(gw_pid), proc_cpu(fake_pid), time.process_time()
            if args.profile:
                (await control.get(f"{gw_url}{CONTROL}profile?start")).raise_for_status()
            with Sampler(gw_pid, fake_port, args.sample_interval, args.rung_seconds + 10) as sampler:
                rung.latencies, rung.errors, rung.abandoned, rung.wall = await fire(
                    client, gw_url, fal_url, k, args.rung_seconds
                )
                rung.cpu, rung.fake_cpu = proc_cpu(gw_pid) - cpu0, proc_cpu(fake_pid) - fake_cpu0
                rung.bench_cpu = time.process_time() - bench_cpu0
                rung.lag = (await control.get(f"{gw_url}{CONTROL}probe")).json()
            if args.profile:
                dump = str(Path(args.profile).resolve() / f"{mode}-{k}.pstats")
                (await control.get(f"{gw_url}{CONTROL}profile", params={"dump": dump})).raise_for_status()
                print(f"  cProfile of the gateway's loop thread: {dump}")
            rung.fake = (await control.get(f"{fal_url}{CONTROL}stats")).json()
            rung.ok = len(rung.latencies)
            rung.rss_peak, rung.threads = sampler.peak_rss, sampler.peak_threads
            rung.established_peak, rung.time_wait_peak = (
                sampler.peak_established,
                max(0, sampler.peak_time_wait - sampler.time_wait_start),
            )
            await asyncio.sleep(args.settle)
            rung.rss_after = proc_status(gw_pid)["VmRSS"]
            rung.established_after = sockets_to(gw_pid, fake_port)[0]
            if rung.abandoned:  # let the gateway cancel the abandoned work before it is stopped (bounded)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    if (await control.get(f"{gw_url}{CONTROL}probe")).json()["tasks"] <= idle_tasks + 10:
                        break
                    await asyncio.sleep(0.5)
            for _ in range(args.bursts - 1):  # the same burst again on the same gateway: leak or reuse?
                await setup(
                    {
                        "queue_polls": args.queue_polls,
                        "progress_polls": args.progress_polls,
                        "stream_interval": stream_interval,
                    }
                )
                with Sampler(gw_pid, fake_port, args.sample_interval, args.rung_seconds + 10) as again:
                    _, errors, abandoned, _ = await fire(client, gw_url, fal_url, k, args.rung_seconds)
                rung.errors += errors
                rung.abandoned = rung.abandoned or abandoned
                await asyncio.sleep(args.settle)
                rung.more_bursts.append((again.peak_rss, proc_status(gw_pid)["VmRSS"]))
    gc.collect()
    return rung


# ------------------------------------------------------------------------------------------------
# Report


def _kib(value: float) -> str:
    return f"{value / 1024:.1f} MiB"


def report(rungs: list[Rung], stream: Rung | None, poll_at_stream_k: Rung | None, args: argparse.Namespace) -> bool:
    print()
    print(f"inflight: {machine_line()}")
    print(
        f"  scenario: {args.queue_polls} x IN_QUEUE + {args.progress_polls} x IN_PROGRESS, COMPLETED on status "
        f"tick {args.queue_polls + args.progress_polls + 1}; gateway poll_interval={args.poll_interval} s, "
        f"poll_max_interval={args.poll_max_interval} s; fresh gateway per rung, {args.warmup} warm-up requests"
        f"{WHAT_IF_NOTE if args.what_if_linear_pool else ''}"
    )
    everything = [*rungs, *([stream] if stream else [])]
    ok = all(r.all_ok for r in everything)

    print()
    print("outcome and memory (RSS of the gateway process; KiB/req = (peak - before) / K)")
    print(
        f"{'mode':6s} {'K':>5s} {'ok':>9s} {'wall':>6s} {'p50':>6s} {'max':>6s} | {'RSS before':>10s} {'peak':>9s} "
        f"{'after':>9s} {'KiB/req':>7s} | {'threads':>7s} {'tasks':>5s} {'tasks/req':>9s}"
    )
    for r in everything:
        lat = r.latencies
        print(
            f"{r.mode:6s} {r.k:5d} {r.ok:4d}/{r.k:<4d} {r.wall:5.1f}s {percentile(lat, 50):5.1f}s "
            f"{max(lat, default=math.nan):5.1f}s | {_kib(r.rss_before):>10s} {_kib(r.rss_peak):>9s} "
            f"{_kib(r.rss_after):>9s} {r.rss_per_request:7.1f} | {r.threads:7d} {r.lag['peak_tasks']:5d} "
            f"{r.lag['peak_tasks'] / r.k:9.2f}"
        )

    print()
    print("CPU and event loop (ms/HTTP = gateway CPU / (K + upstream requests); cores = gateway CPU / wall)")
    print(
        f"{'mode':6s} {'K':>5s} | {'ms/req':>6s} {'ms/HTTP':>7s} {'cores':>5s} | {'fake':>5s} {'client':>6s} | "
        f"{'GC':>5s} {'gen2':>4s} {'GC max':>6s} | {'lag max':>7s} {'p99':>6s} {'mean':>6s}"
    )
    for r in everything:
        gc_stats = r.lag
        print(
            f"{r.mode:6s} {r.k:5d} | {1000 * r.cpu_per_request:6.1f} {1000 * r.cpu_per_exchange:7.2f} "
            f"{ratio(r.cpu, r.wall):5.2f} | {r.fake_cpu:4.1f}s {r.bench_cpu:5.1f}s | "
            f"{gc_stats['gc_seconds']:4.1f}s {gc_stats['gc_collections'][2]:4d} "
            f"{1000 * gc_stats['gc_max_pause']:4.0f}ms | "
            f"{1000 * r.lag['max']:5.0f}ms {1000 * r.lag['p99']:4.0f}ms {1000 * r.lag['mean']:4.1f}ms"
        )

    print()
    print("upstream (what the fake received) and connections (gateway -> fake)")
    print(
        f"{'mode':6s} {'K':>5s} | {'req/s':>6s} {'polls/s':>7s} {'polls/job':>9s} {'req/job':>7s} "
        f"{'peak polls/s':>12s} {'peak/mean':>9s} | {'peak conns':>10s} {'opened':>6s} {'TIME_WAIT+':>10s} "
        f"{'after':>5s}"
    )
    for r in everything:
        print(
            f"{r.mode:6s} {r.k:5d} | {r.upstream_per_s:6.1f} {r.polls_per_s:7.1f} {r.polls_per_job:9.2f} "
            f"{r.upstream_per_job:7.2f} {r.peak_polls_per_s:12.0f} "
            f"{ratio(r.peak_polls_per_s, r.polls_per_s) if r.polls_per_s else math.nan:9.1f} | "
            f"{r.established_peak:10d} {r.fake['client_ports']:6d} {r.time_wait_peak:10d} {r.established_after:5d}"
        )

    for r in everything:
        if r.more_bursts:
            again = ", ".join(f"{_kib(peak)} / {_kib(after)}" for peak, after in r.more_bursts)
            print(f"{r.mode:6s} {r.k:5d}: RSS peak / after of the same burst repeated on that gateway: {again}")

    base = rungs[0]
    print()
    print(
        f"ratios to K={base.k} (~1 = scales flat; polls/s per job < 1 and p50 > 1 mean jobs took longer than the model)"
    )
    print(
        f"{'K':>5s} {'KiB/req x':>9s} {'CPU/req x':>9s} {'ms/HTTP x':>9s} {'polls/job x':>11s} {'polls/s/job x':>13s} "
        f"{'p50 x':>6s} {'lag p99 x':>9s}"
    )
    for r in rungs:
        print(
            f"{r.k:5d} {ratio(r.rss_per_request, base.rss_per_request):9.2f} "
            f"{ratio(r.cpu_per_request, base.cpu_per_request):9.2f} "
            f"{ratio(r.cpu_per_exchange, base.cpu_per_exchange):9.2f} "
            f"{ratio(r.polls_per_job, base.polls_per_job):11.2f} "
            f"{ratio(r.polls_per_s / r.k, base.polls_per_s / base.k):13.2f} "
            f"{ratio(percentile(r.latencies, 50), percentile(base.latencies, 50)):6.2f} "
            f"{ratio(r.lag['p99'], base.lag['p99']):9.2f}"
        )
    if stream is not None and poll_at_stream_k is not None:
        p, s = poll_at_stream_k, stream
        print()
        print(
            f"SSE status stream vs polling at K={s.k} (stream interval {s.stream_interval:.2f} s per tick: a job "
            f"lasts as long as under polling at K={base.k}; p50 stream {percentile(s.latencies, 50):.1f} s, "
            f"poll {percentile(p.latencies, 50):.1f} s, poll at K={base.k} {percentile(base.latencies, 50):.1f} s)"
        )
        print(
            f"  upstream requests/s   stream/poll = {s.upstream_per_s:.1f}/{p.upstream_per_s:.1f} = "
            f"{ratio(s.upstream_per_s, p.upstream_per_s):.2f}"
        )
        print(
            f"  upstream requests/job stream/poll = {s.upstream_per_job:.2f}/{p.upstream_per_job:.2f} = "
            f"{ratio(s.upstream_per_job, p.upstream_per_job):.2f}"
        )
        print(
            f"  gateway CPU/req       stream/poll = {1000 * s.cpu_per_request:.1f}/{1000 * p.cpu_per_request:.1f} ms = "
            f"{ratio(s.cpu_per_request, p.cpu_per_request):.2f}"
        )
        print(
            f"  connections           stream/poll = peak {s.established_peak}/{p.established_peak}, opened "
            f"{s.fake['client_ports']}/{p.fake['client_ports']}"
        )
    for r in everything:
        if r.errors or r.abandoned:
            kinds = Counter(e[:120] for e in r.errors)
            print(
                f"  {r.mode} K={r.k}: {len(r.errors)} errors{', abandoned after --rung-seconds' if r.abandoned else ''}"
            )
            for kind, count in kinds.most_common(3):
                print(f"    {count} x {kind}")
        if r.fake.get("cancels"):
            print(f"  {r.mode} K={r.k}: the gateway cancelled {r.fake['cancels']} fal jobs")
    return ok


async def measure(args: argparse.Namespace, fal_url: str, fake_pid: int) -> tuple[list[Rung], Rung | None, Rung | None]:
    rungs: list[Rung] = []
    for k in args.ladder:
        rung = await run_rung(args, fal_url, fake_pid, k, mode="poll")
        print(
            f"  poll   K={k:5d}: {rung.ok}/{k} ok in {rung.wall:.1f} s, peak RSS {_kib(rung.rss_peak)}, "
            f"{rung.fake['status_polls']} status polls, {rung.fake['client_ports']} connections opened",
            flush=True,
        )
        rungs.append(rung)
    stream = poll_rung = None
    if not args.no_stream:
        poll_rung = next((r for r in rungs if r.k == args.stream_k), None)
        if poll_rung is None:
            poll_rung = await run_rung(args, fal_url, fake_pid, args.stream_k, mode="poll")
            print(
                f"  poll   K={args.stream_k:5d}: {poll_rung.ok}/{poll_rung.k} ok in {poll_rung.wall:.1f} s", flush=True
            )
        interval = args.stream_interval
        if interval is None:  # a job lasts as long as it did under polling at the first (unsaturated) rung
            ticks = args.queue_polls + args.progress_polls
            interval = percentile(rungs[0].latencies, 50) / ticks if rungs[0].latencies and ticks else 0.5
        stream = await run_rung(args, fal_url, fake_pid, args.stream_k, mode="stream", stream_interval=interval)
        print(
            f"  stream K={args.stream_k:5d}: {stream.ok}/{stream.k} ok in {stream.wall:.1f} s, "
            f"{stream.fake['stream_opens']} stream opens, {stream.fake['status_polls']} status polls",
            flush=True,
        )
    return rungs, stream, poll_rung


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ladder",
        type=int,
        nargs="+",
        default=[100, 500, 1000],
        help="K per rung; ratios are against the first (default 100 500 1000)",
    )
    parser.add_argument("--with-2000", action="store_true", help="add a K=2000 rung to the ladder")
    parser.add_argument("--queue-polls", type=int, default=1, help="fake: IN_QUEUE status ticks per job (default 1)")
    parser.add_argument(
        "--progress-polls", type=int, default=3, help="fake: IN_PROGRESS status ticks per job (default 3)"
    )
    parser.add_argument("--poll-interval", type=float, default=0.5, help="gateway providers.fal.poll_interval")
    parser.add_argument("--poll-max-interval", type=float, default=3.0, help="gateway providers.fal.poll_max_interval")
    parser.add_argument("--no-stream", action="store_true", help="skip the SSE status-stream comparison")
    parser.add_argument("--stream-k", type=int, default=1000, help="K of the stream-vs-poll comparison (default 1000)")
    parser.add_argument(
        "--stream-interval",
        type=float,
        default=None,
        help="fake's SSE seconds per status tick (default: the first rung's p50 latency / "
        "status ticks, so a job lasts as long as under unsaturated polling)",
    )
    parser.add_argument(
        "--what-if-linear-pool",
        action="store_true",
        help="diagnostic: run the gateway with httpcore's pool assignment replaced by a one-pass "
        "version (see linear_pool_patch); not the gateway as shipped",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="cProfile the gateway's event-loop thread during each rung, write DIR/<mode>-<K>.pstats "
        "(slows the gateway down; off by default)",
    )
    parser.add_argument("--warmup", type=int, default=16, help="instant requests on each fresh gateway (default 16)")
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="client timeout per request, also the gateway's deadline (default 120)",
    )
    parser.add_argument("--rung-seconds", type=float, default=90.0, help="abandon a rung after this (default 90)")
    parser.add_argument("--sample-interval", type=float, default=0.1, help="RSS/socket sampling period (default 0.1)")
    parser.add_argument(
        "--bursts",
        type=int,
        default=1,
        help="send each rung's burst this many times to the same gateway; the repeats only report RSS "
        "(does memory come back or keep growing?) (default 1)",
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after a rung before RSS 'after' (default 1)")
    parser.add_argument(
        "--fake-keepalive", type=float, default=75.0, help="fake's idle keep-alive timeout (default 75)"
    )
    args = parser.parse_args(argv)
    if args.with_2000 and 2000 not in args.ladder:
        args.ladder.append(2000)
    print(
        f"inflight: ladder {args.ladder}, stream comparison at K={args.stream_k}{' (off)' if args.no_stream else ''}",
        flush=True,
    )
    backlog = max(2048, 2 * max([*args.ladder, args.stream_k]))
    with child(_serve_fake, args.fake_keepalive, backlog, what="fake fal") as (fal_url, fake_pid):
        rungs, stream, poll_rung = asyncio.run(measure(args, fal_url, fake_pid))
    return 0 if report(rungs, stream, poll_rung, args) else 1


if __name__ == "__main__":
    raise SystemExit(main())
