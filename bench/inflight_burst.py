"""K long requests fired at once: one gateway process vs a lean client straight to the fake.

Three processes on 127.0.0.1, each with its open-file limit raised to the hard limit:

  fake     tests.fakes.lean_fal.LeanFal: fal's queue protocol from a bare asyncio.Protocol, each
           job COMPLETED --model-seconds after its submit (wall time, not a poll count), so both
           sides poll for the same model time and the fake costs tens of microseconds a request.
  gateway  `imagegate serve` (the real CLI and its server runtime: listening sockets, connection
           cap; bench/services.py), fal pointed at the fake, url passthrough, the real polling
           defaults (0.5 s growing x1.5 to 3 s, +-25 % jitter), or fal's SSE status stream with
           --status-stream; a fresh process per run.
  bench    this process. `direct`: K jobs driven straight against the fake by a lean raw-socket
           client (one keep-alive connection per job: submit, status polls on the gateway's own
           schedule, result). `gateway`: K `POST /v1/images/generations` (qwen-image,
           response_format=url), one connection each. Connects are paced (--connect-concurrency in
           progress at once) so the kernel's accept backlog does not turn a burst into SYN retries;
           every request is in flight before the first job ends. Meanwhile a prober sends
           `GET /healthz` every 50 ms on its own connection, and another does the same from a
           process of its own (printed below the row: the gateway's latency alone, without this
           busy process's event loop; the verdict uses it, and prints the first beside it).

Reported per K: ok, wall (first send to last answer), p50/max latency, wall gateway/direct,
upstream requests per job (what the fake counted) gateway vs direct, the gateway's peak RSS and
CPU, the fake's and this process's CPU (so a saturated fake or client shows), /healthz p50/p99/max.

    .venv/bin/python bench/inflight_burst.py                       # K = 3000 then 10000, ~2 min
    .venv/bin/python bench/inflight_burst.py --ladder 1000 --model-seconds 2

Exit status 1 if any request failed or a target was missed (--max-wall-ratio, --max-rss-mib,
--max-healthz-p99-ms). Bounded: every request has --request-timeout, every run --run-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import services
from bench._common import FAL_KEY, machine_line, percentile, ratio
from bench.inflight import child, proc_cpu, proc_status

MODEL = "qwen-image"
ENDPOINT = "fal-ai/qwen-image"
CHILD_LIFETIME = 900.0
COUNTED = ("requests", "submits", "status_polls", "streams")  # what the fake counts, per run


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ------------------------------------------------------------------------------------------------
# Server processes


def _serve_fake(conn: Any, stop: Any, model_seconds: float) -> None:
    raise_nofile()
    from tests.fakes.lean_fal import LeanFal

    async def main() -> None:
        fake = LeanFal(key=FAL_KEY, model_seconds=model_seconds)
        conn.send(await fake.start())
        await asyncio.get_running_loop().run_in_executor(None, stop.wait, CHILD_LIFETIME)
        await fake.close()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------------
# A lean HTTP/1.1 client on asyncio streams (Content-Length bodies only)


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> Conn:
        host_port = url.split("//", 1)[1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
        return cls(reader, writer, host_port)

    async def request(self, method: str, target: str, body: bytes = b"", headers: str = "") -> tuple[int, bytes]:
        if target.startswith("http"):
            target = "/" + target.split("//", 1)[1].split("/", 1)[1]
        head = (
            f"{method} {target} HTTP/1.1\r\nhost: {self.host}\r\ncontent-length: {len(body)}\r\n"
            f"content-type: application/json\r\n{headers}\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readuntil(b"\r\n")
        length = 0
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = await self.reader.readexactly(length) if length else b""
        return int(status_line.split(b" ", 2)[1]), data

    def close(self) -> None:
        self.writer.close()


AUTH = f"authorization: Key {FAL_KEY}\r\n"


async def direct_job(fal_url: str, gate: asyncio.Semaphore, payload: bytes) -> None:
    """submit -> status (the gateway's schedule: first poll at once, 0.5 s x1.5 up to 3 s, +-25 %)
    -> result."""
    async with gate:
        conn = await Conn.open(fal_url)
    try:
        status, body = await conn.request("POST", f"/{ENDPOINT}", payload, AUTH)
        if status != 200:
            raise RuntimeError(f"submit -> {status}")
        handle = json.loads(body)
        delay = 0.5
        while True:
            status, body = await conn.request("GET", handle["status_url"], b"", AUTH)
            if status == 200 and json.loads(body)["status"] == "COMPLETED":
                break
            if status not in (200, 202):
                raise RuntimeError(f"status -> {status}")
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(3.0, delay * 1.5)
        status, body = await conn.request("GET", handle["response_url"], b"", AUTH)
        if status != 200 or not json.loads(body)["images"]:
            raise RuntimeError(f"result -> {status}")
    finally:
        conn.close()


async def gateway_job(gw_url: str, fal_url: str, gate: asyncio.Semaphore, payload: bytes) -> None:
    async with gate:
        conn = await Conn.open(gw_url)
    try:
        status, body = await conn.request("POST", "/v1/images/generations", payload)
        if status != 200:
            raise RuntimeError(f"gateway -> {status} {body[:200]!r}")
        url = json.loads(body)["data"][0]["url"]
        if not url.startswith(fal_url):
            raise RuntimeError(f"not fal's own URL: {url}")
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------
# One run


@dataclass
class Run:
    side: str
    k: int
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    upstream: dict[str, Any] = field(default_factory=dict)
    healthz: list[float] = field(default_factory=list)
    healthz_errors: int = 0
    healthz_apart: list[float] = field(default_factory=list)  # seen from a process of its own
    # (generation, wall s, CPU s, objects collected, started) per collection, --gc-stats
    gc_pauses: list[tuple[int, float, float, int, float]] = field(default_factory=list)
    loop_lags: list[tuple[float, float]] = field(default_factory=list)  # (when, seconds), --gc-stats
    gc_stats_on: bool = False
    rss_peak_kib: int = 0
    rss_before_kib: int = 0
    cpu: float = 0.0  # the gateway's (gateway side only)
    fake_cpu: float = 0.0
    bench_cpu: float = 0.0

    @property
    def per_job(self) -> float:
        return ratio(self.upstream.get("requests", 0), self.upstream.get("submits", 0))


def _probe_healthz_apart(gw_url: str, stop: Any, out: Any) -> None:
    """The same prober in a process of its own (blocking sockets): the latencies it sees are the
    gateway's, not also this busy client's event loop. Sends its list through `out` at `stop`."""
    import socket

    host, port = gw_url.removeprefix("http://").split(":")
    request = b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n"
    latencies: list[float] = []
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                sock.sendall(request)
                data = b""
                while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed")
                    data += chunk
            except OSError:
                sock.close()
                sock = socket.create_connection((host, int(port)), timeout=10)
            latencies.append(time.perf_counter() - t0)
            stop.wait(0.05)
    finally:
        sock.close()
        out.send(latencies)


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.startswith(b"content-length:"))


async def _probe_healthz(gw_url: str, stop: asyncio.Event, run: Run) -> None:
    conn = await Conn.open(gw_url)
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                status, _ = await asyncio.wait_for(conn.request("GET", "/healthz"), 10)
                if status != 200:
                    run.healthz_errors += 1
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                run.healthz_errors += 1
                conn.close()
                conn = await Conn.open(gw_url)
            run.healthz.append(time.perf_counter() - t0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
    finally:
        conn.close()


async def fire(run: Run, make: Any, args: argparse.Namespace) -> None:
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def timed() -> None:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(args.request_timeout):
                await make(gate)
        except Exception as exc:
            run.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        run.latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    tasks = [asyncio.ensure_future(timed()) for _ in range(run.k)]
    _, pending = await asyncio.wait(tasks, timeout=args.run_seconds)
    for task in pending:
        task.cancel()
    if pending:
        run.errors.append(f"{len(pending)} abandoned after --run-seconds")
        await asyncio.gather(*pending, return_exceptions=True)
    run.wall = time.perf_counter() - start


async def control(fal_url: str, what: str) -> dict[str, Any]:
    conn = await Conn.open(fal_url)
    try:
        _, body = await conn.request("GET", f"/__{what}")
        return dict(json.loads(body))
    finally:
        conn.close()


async def run_direct(args: argparse.Namespace, k: int, fal_url: str, fake_pid: int, payload: bytes) -> Run:
    run = Run("direct", k)
    before = await control(fal_url, "stats")
    fake0, bench0 = proc_cpu(fake_pid), time.process_time()
    await fire(run, lambda gate: direct_job(fal_url, gate, payload), args)
    run.fake_cpu, run.bench_cpu = proc_cpu(fake_pid) - fake0, time.process_time() - bench0
    after = await control(fal_url, "stats")
    run.upstream = {key: after[key] - before.get(key, 0) for key in COUNTED}
    run.upstream["requests"] -= 1  # the stats request itself
    return run


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux: /proc/<pid>/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


async def run_gateway(args: argparse.Namespace, k: int, fal_url: str, fake_pid: int, storage: str) -> Run:
    run = Run("gateway", k)
    body = json.dumps({"model": MODEL, "prompt": "a lighthouse at dusk", "response_format": "url"}).encode()
    gc_stats = Path(storage) / f"gc-{k}.json" if args.gc_stats else None
    with _gc_probe(gc_stats), services.imagegate(
        Path(storage), fal_url, poll=0.5, poll_max=3.0, status_stream=args.status == "stream",
        status_stream_max=args.status_stream_max, starts_per_tick=args.starts_per_tick, name=f"imagegate-{k}",
        workers=args.workers,
    ) as gateway_service:
        gw_url, gw_pid = gateway_service.url, gateway_service.proc.pid
        for _ in range(args.warmup):
            await gateway_job(gw_url, fal_url, asyncio.Semaphore(1), body)
        pids = [gw_pid, *_children(gw_pid)]  # --workers N: the supervisor and its N workers

        def rss_kib() -> int:
            return sum(proc_status(pid)["VmRSS"] for pid in pids)

        def cpu_s() -> float:
            return sum(proc_cpu(pid) for pid in pids)
        before = await control(fal_url, "stats")
        gc_before, lags_before = _gc_pauses(gc_stats)
        run.rss_before_kib = rss_kib()
        cpu0, fake0, bench0 = cpu_s(), proc_cpu(fake_pid), time.process_time()
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(0.1):
                run.rss_peak_kib = max(run.rss_peak_kib, rss_kib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        spy = None
        if args.py_spy:  # sampled profile of the gateway during the burst (collapsed stacks)
            import subprocess

            out = Path(args.py_spy) / f"gateway-{k}.txt"
            venv_spy = Path(sys.executable).parent / "py-spy"
            spy = subprocess.Popen(
                [str(venv_spy) if venv_spy.exists() else "py-spy", "record", "--nonblocking", "--pid", str(gw_pid),
                 "--format", "raw", "--rate", "200", "-o", str(out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        stop = asyncio.Event()
        prober = asyncio.ensure_future(_probe_healthz(gw_url, stop, run))
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        stop_apart, (receive_apart, send_apart) = spawn.Event(), spawn.Pipe(duplex=False)
        apart = spawn.Process(target=_probe_healthz_apart, args=(gw_url, stop_apart, send_apart), daemon=True)
        probing_gc = os.environ.pop("BENCH_GC_STATS", None)  # the gateway's probe only, not the prober's
        try:
            apart.start()
        finally:
            if probing_gc is not None:
                os.environ["BENCH_GC_STATS"] = probing_gc
        await asyncio.sleep(0.2)
        await fire(run, lambda gate: gateway_job(gw_url, fal_url, gate, body), args)
        stop.set()
        await prober
        stop_apart.set()
        if receive_apart.poll(15):
            run.healthz_apart = receive_apart.recv()
        apart.join(5)
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(30)
        stop_sampling.set()
        sampler.join(2)
        run.cpu, run.fake_cpu = cpu_s() - cpu0, proc_cpu(fake_pid) - fake0
        run.bench_cpu = time.process_time() - bench0
        run.rss_peak_kib = max(run.rss_peak_kib, rss_kib())
        after = await control(fal_url, "stats")
        run.upstream = {key: after[key] - before.get(key, 0) for key in COUNTED}
        run.upstream["requests"] -= 1
        pauses, lags = _gc_pauses(gc_stats)
        run.gc_stats_on = gc_stats is not None
        run.gc_pauses, run.loop_lags = pauses[len(gc_before):], lags[len(lags_before):]
    return run


@contextlib.contextmanager
def _gc_probe(path: Path | None) -> Any:
    """The gateway started meanwhile records its collections into `path` (bench/gcprobe)."""
    if path is None:
        yield
        return
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "BENCH_GC_STATS")}
    probe = str(Path(__file__).resolve().parent / "gcprobe")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [probe, saved["PYTHONPATH"]]))
    os.environ["BENCH_GC_STATS"] = str(path)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _gc_pauses(path: Path | None) -> tuple[list[tuple[int, float, float, int, float]], list[tuple[float, float]]]:
    """The gateway's collections and loop lags so far (--gc-stats; its probe rewrites the file once
    a second)."""
    if path is None:
        return [], []
    time.sleep(1.2)
    try:
        stats = json.loads(path.read_text())
        pauses = [(int(g), float(w), float(c), int(n), float(t)) for g, w, c, n, t in stats["pauses"]]
        return pauses, [(float(t), float(lag)) for t, lag in stats["lags"]]
    except (OSError, ValueError, KeyError):
        return [], []


def report(pairs: list[tuple[Run, Run]], args: argparse.Namespace) -> bool:
    print()
    most = "default" if args.status_stream_max is None else args.status_stream_max
    how = f"status stream (status_stream_max {most})" if args.status == "stream" else "polling"
    workers = "" if args.workers == 1 else f", --workers {args.workers}"
    print(f"burst: {machine_line()}; model {args.model_seconds} s, fal queue protocol, gateway: {how}{workers}")
    print(
        f"{'side':8s} {'K':>6s} {'ok':>11s} {'wall':>7s} {'p50':>7s} {'max':>7s} {'req/job':>7s} "
        f"{'polls/job':>9s} {'streams/job':>11s} | {'gw CPU':>7s} {'fake CPU':>8s} {'client CPU':>10s} | "
        f"{'RSS peak':>9s} | "
        f"{'healthz p50/p99/max (n, errors)':>32s}"
    )
    ok = True
    for direct, gateway in pairs:
        for run in (direct, gateway):
            lat = run.latencies
            polls = ratio(run.upstream.get("status_polls", 0), run.upstream.get("submits", 0))
            streams = ratio(run.upstream.get("streams", 0), run.upstream.get("submits", 0))
            health = (
                f"{1000 * percentile(run.healthz, 50):.1f}/{1000 * percentile(run.healthz, 99):.1f}/"
                f"{1000 * max(run.healthz):.0f} ms ({len(run.healthz)}, {run.healthz_errors})"
                if run.healthz
                else "-"
            )
            print(
                f"{run.side:8s} {run.k:6d} {len(lat):5d}/{run.k:<5d} {run.wall:6.1f}s "
                f"{percentile(lat, 50):6.1f}s {max(lat, default=float('nan')):6.1f}s {run.per_job:7.2f} "
                f"{polls:9.2f} {streams:11.2f} | {run.cpu:6.1f}s {run.fake_cpu:7.1f}s {run.bench_cpu:9.1f}s | "
                f"{run.rss_peak_kib / 1024 if run.rss_peak_kib else float('nan'):7.0f}MiB | {health:>32s}"
            )
            if run.gc_pauses:
                for gen in (0, 1, 2):
                    walls = [w for g, w, _, _, _ in run.gc_pauses if g == gen]
                    cpus = [c for g, _, c, _, _ in run.gc_pauses if g == gen]
                    freed = sum(n for g, _, _, n, _ in run.gc_pauses if g == gen)
                    if walls:
                        print(
                            f"    gc gen{gen}: {len(walls)} collections, wall {sum(walls):.2f} s "
                            f"(max {1000 * max(walls):.0f} ms), CPU {sum(cpus):.2f} s (max {1000 * max(cpus):.0f} ms), "
                            f"{freed} objects collected"
                        )
            if run.healthz_apart:
                apart = run.healthz_apart
                print(
                    f"    healthz from a process of its own: {1000 * percentile(apart, 50):.1f}/"
                    f"{1000 * percentile(apart, 99):.1f}/{1000 * max(apart):.0f} ms ({len(apart)})"
                )
            if run.gc_stats_on:
                long = [(t, lag) for t, lag in run.loop_lags if lag > 0.1]
                in_gc = sum(
                    any(start - 0.01 <= t + lag and t <= start + wall for _, wall, _, _, start in run.gc_pauses)
                    for t, lag in long
                )
                print(
                    f"    loop lag > 100 ms: {len(long)} times, {in_gc} of them with a collection; "
                    f"> 50 ms: {sum(lag > 0.05 for _, lag in run.loop_lags)}; "
                    f"max {1000 * max((lag for _, lag in run.loop_lags), default=0):.0f} ms"
                )
            for error in sorted(set(run.errors))[:3]:
                print(f"    error x{run.errors.count(error)}: {error}")
        wall_x = ratio(gateway.wall, direct.wall)
        per_job_ok = gateway.per_job <= direct.per_job + 1e-9
        rss_ok = gateway.rss_peak_kib / 1024 <= args.max_rss_mib
        # the gateway's latency alone: the prober in a process of its own (this process's prober also
        # waits behind its own event loop, busy with K connections); both are printed
        p99_here = 1000 * percentile(gateway.healthz, 99) if gateway.healthz else float("inf")
        probed = gateway.healthz_apart
        p99 = 1000 * percentile(probed, 99) if probed else p99_here
        all_ok = len(gateway.latencies) == gateway.k and len(direct.latencies) == direct.k
        verdict = all_ok and wall_x <= args.max_wall_ratio and per_job_ok and rss_ok and p99 <= args.max_healthz_p99_ms
        ok = ok and verdict
        print(
            f"  K={gateway.k}: wall gateway/direct {wall_x:.2f} (<= {args.max_wall_ratio}), requests/job "
            f"{gateway.per_job:.2f} vs {direct.per_job:.2f}, RSS {gateway.rss_peak_kib / 1024:.0f} MiB "
            f"(<= {args.max_rss_mib}), healthz p99 {p99:.1f} ms (<= {args.max_healthz_p99_ms}; "
            f"{p99_here:.1f} ms from this process): "
            f"{'MET' if verdict else 'NOT MET'}"
        )
    return ok


async def measure(args: argparse.Namespace, fal_url: str, fake_pid: int) -> list[tuple[Run, Run]]:
    raise_nofile()
    pairs = []
    plan = {"prompt": "a lighthouse at dusk", "num_images": 1, "output_format": "png"}
    payload = json.dumps(plan).encode()
    with tempfile.TemporaryDirectory(prefix="imagegate-burst-") as storage:
        for k in args.ladder:
            direct = await run_direct(args, k, fal_url, fake_pid, payload)
            print(f"  direct  K={k}: {len(direct.latencies)}/{k} ok in {direct.wall:.1f} s", flush=True)
            await asyncio.sleep(2)
            gateway = await run_gateway(args, k, fal_url, fake_pid, storage)
            print(f"  gateway K={k}: {len(gateway.latencies)}/{k} ok in {gateway.wall:.1f} s", flush=True)
            pairs.append((direct, gateway))
            await asyncio.sleep(2)
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ladder", type=int, nargs="+", default=[3000, 10000])
    parser.add_argument("--model-seconds", type=float, default=5.0)
    parser.add_argument("--connect-concurrency", type=int, default=512, help="connects in progress at once")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--run-seconds", type=float, default=150.0)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument(
        "--status", choices=("stream", "poll"), default="stream",
        help="how the gateway follows a job: fal's SSE status stream (its default) or polling",
    )
    parser.add_argument(
        "--status-stream-max", type=int, help="providers.fal.status_stream_max (default: the gateway's own)"
    )
    parser.add_argument("--starts-per-tick", type=int, help="server.starts_per_tick (default: the gateway's own)")
    parser.add_argument(
        "--workers", type=int, default=1,
        help="imagegate serve --workers N (CPU and RSS are then the sum over the supervisor and its workers)",
    )
    parser.add_argument("--py-spy", metavar="DIR", help="py-spy record the gateway during each burst into DIR")
    parser.add_argument(
        "--gc-stats", action="store_true",
        help="record the gateway's garbage collections (count, pauses per generation) during each burst",
    )
    parser.add_argument("--max-wall-ratio", type=float, default=1.3)
    parser.add_argument("--max-rss-mib", type=float, default=1024)
    parser.add_argument("--max-healthz-p99-ms", type=float, default=100)
    args = parser.parse_args(argv)
    with child(_serve_fake, args.model_seconds, what="fake fal") as (fal_url, fake_pid):
        pairs = asyncio.run(measure(args, fal_url, fake_pid))
    return 0 if report(pairs, args) else 1


if __name__ == "__main__":
    raise SystemExit(main())
