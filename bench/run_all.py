"""The whole benchmark suite in one command; rewrites BENCHMARKS.md and its plots.

    .venv/bin/python bench/run_all.py            # full run, about 10-15 min on 2 cores
    .venv/bin/python bench/run_all.py --quick    # every section, smaller counts, about 4 min

What runs (every server a process of its own on 127.0.0.1, every loop bounded by count and time):

  latency      zero model time; concurrency 1, 8, 32: a lean direct client against the fake fal
               (queue protocol and sync run), imagegate (fal queue mode and fal sync mode, URL
               passthrough) and LiteLLM's proxy (fal sync run). p50/p99, throughput, CPU per
               request of every process, the load client's and the fake's included.
  fakes        the direct queue client at c=32 against one fake and against two fake processes:
               if two do not raise throughput, the fake is not what limits the others.
  server       imagegate on asyncio + h11 vs uvloop + httptools (c=1, c=8).
  workers      `imagegate serve --workers 1` vs `--workers 2` (c=1, c=32), CPU per request.
  inflight     K requests at once, 5 s model time: success and wall for direct (polling with the
               gateway's schedule), imagegate (real polling defaults) and LiteLLM (sync run).
  burst        bench/inflight_burst.py: 3,000 and 10,000 jobs at once through one gateway process vs a
               raw-socket direct client (RSS, /healthz, upstream requests per job).
  conversions  bench/conversions.py: the gateway's conversion vs a bare Pillow decode + encode.
  instructions bench/instructions.py (callgrind): instructions per c=1 request, this tree and the
               tree of BASELINE_COMMIT in the same run (needs valgrind).

Then `bench/plots.py` (run in the benchmark's own virtualenv, bench/.venv, with LiteLLM and
matplotlib; created on first use) draws the PNGs and `bench/report.py` writes BENCHMARKS.md.
Raw results go to bench/results/latest.json. bench/gateway_overhead.py, bench/inflight.py and
bench/event_loop.py remain the detailed, single-topic benchmarks (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import leanclient as lc
from bench import services
from bench._common import machine_line

ROOT = services.ROOT
RESULTS = ROOT / "bench" / "results"


def _summary(result: lc.LoadResult, cpu: dict[str, float]) -> dict[str, Any]:
    ok = max(result.ok, 1)
    return {
        "ok": result.ok,
        "errors": len(result.errors),
        "error_sample": result.errors[:3],
        "p50_ms": result.p(50) * 1000,
        "p99_ms": result.p(99) * 1000,
        "rps": result.throughput,
        "wall_s": result.wall,
        "cpu_ms_per_req": {name: seconds * 1000 / ok for name, seconds in cpu.items()},
        "client_cpu_ms_per_req": result.client_cpu * 1000 / ok,
    }


async def _measure(run: Callable[[], Awaitable[lc.LoadResult]], watched: dict[str, services.Service]) -> dict[str, Any]:
    before = {name: svc.cpu() for name, svc in watched.items()}
    result = await run()
    cpu = {name: svc.cpu() - before[name] for name, svc in watched.items()}
    return _summary(result, cpu)


async def _interleaved(
    onces: dict[str, Callable[[], Awaitable[int]]],
    watched: dict[str, dict[str, services.Service]],
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    """c=1, targets interleaved; CPU per request of each target's proxy, and of the shared fake overall."""
    procs = {svc.proc.pid: svc for w in watched.values() for svc in w.values()}
    before = {pid: svc.cpu() for pid, svc in procs.items()}
    results = await lc.interleaved(
        onces, requests=args.requests, max_seconds=args.point_seconds * 2, warmup=args.warmup
    )
    spent = {pid: svc.cpu() - before[pid] for pid, svc in procs.items()}
    total = max(sum(r.ok for r in results.values()), 1)
    out = {}
    for name, result in results.items():
        cpu = {}
        for role, svc in watched[name].items():
            per = spent[svc.proc.pid] / total if role.startswith("fake") else spent[svc.proc.pid] / max(result.ok, 1)
            cpu[role] = per * max(result.ok, 1)
        out[name] = _summary(result, cpu)
        out[name]["interleaved"] = True
    return out


async def latency(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(services.fake(work, model_time=0))
        gw_queue = stack.enter_context(services.imagegate(work, fake.url, name="imagegate-queue"))
        gw_sync = stack.enter_context(services.imagegate(work, fake.url, name="imagegate-sync", mode="sync"))
        litellm = stack.enter_context(services.litellm(work, fake.url))
        client = lc.Client()
        targets: dict[str, tuple[Callable[[], Awaitable[int]], dict[str, services.Service]]] = {
            "direct (queue)": (lc.direct_queue(client, fake.url), {"fake": fake}),
            "direct (sync)": (lc.direct_sync(client, fake.url), {"fake": fake}),
            "imagegate (queue)": (
                lc.openai_images(client, gw_queue.url, extra={"response_format": "url"}),
                {"fake": fake, "proxy": gw_queue},
            ),
            "imagegate (sync)": (
                lc.openai_images(client, gw_sync.url, extra={"response_format": "url"}),
                {"fake": fake, "proxy": gw_sync},
            ),
            "litellm (sync)": (lc.openai_images(client, litellm.url), {"fake": fake, "proxy": litellm}),
        }
        print("  latency c=1, all targets interleaved ...", flush=True)
        out_c1 = await _interleaved(
            {name: once for name, (once, _) in targets.items()},
            {name: watched for name, (_, watched) in targets.items()},
            args,
        )
        for name, summary in out_c1.items():
            out.setdefault(name, {})["1"] = summary
        for c in args.concurrency:
            if c == 1:
                continue
            for name, (once, watched) in targets.items():
                print(f"  latency c={c} {name} ...", flush=True)
                out[name][str(c)] = await _measure(
                    lambda once=once, c=c: lc.closed_loop(
                        once, concurrency=c, requests=args.requests * 2, max_seconds=args.point_seconds, warmup=c
                    ),
                    watched,
                )
        await client.close()
    return out


async def fakes(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with services.fake(work, model_time=0, name="fake-a") as a, services.fake(work, model_time=0, name="fake-b") as b:
        for label, urls in (("one fake", [a.url]), ("two fakes", [a.url, b.url])):
            client = lc.Client()
            ones = [lc.direct_queue(client, url) for url in urls]
            counter = iter(range(10**9))

            async def once(ones: list[Callable[[], Awaitable[int]]] = ones, counter: Any = counter) -> int:
                return await ones[next(counter) % len(ones)]()

            print(f"  fakes {label} ...", flush=True)
            out[label] = await _measure(
                lambda once=once: lc.closed_loop(
                    once, concurrency=32, requests=args.requests * 2, max_seconds=args.point_seconds, warmup=32
                ),
                {"fake-a": a, "fake-b": b},
            )
            await client.close()
    return out


async def _side_by_side(
    gateways: dict[str, services.Service], fake: services.Service, args: argparse.Namespace, concurrency: int
) -> dict[str, Any]:
    """Gateways running at the same time: c=1 interleaved, then `concurrency` one after another."""
    client = lc.Client()
    onces = {name: lc.openai_images(client, gw.url, extra={"response_format": "url"}) for name, gw in gateways.items()}
    watched = {name: {"fake": fake, "proxy": gw} for name, gw in gateways.items()}
    print(f"  c=1 interleaved: {', '.join(gateways)} ...", flush=True)
    out: dict[str, Any] = {name: {"1": summary} for name, summary in (await _interleaved(onces, watched, args)).items()}
    for name, once in onces.items():
        print(f"  c={concurrency} {name} ...", flush=True)
        out[name][str(concurrency)] = await _measure(
            lambda once=once: lc.closed_loop(
                once,
                concurrency=concurrency,
                requests=args.requests * 2,
                max_seconds=args.point_seconds,
                warmup=concurrency,
            ),
            watched[name],
        )
    await client.close()
    return out


async def server_options(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(services.fake(work, model_time=0))
        gateways = {
            label: stack.enter_context(
                services.imagegate(work, fake.url, name=f"imagegate-{loop}", loop=loop, http=http)
            )
            for label, loop, http in (
                ("asyncio + h11", "asyncio", "h11"),
                ("uvloop + httptools", "uvloop", "httptools"),
            )
        }
        out = await _side_by_side(gateways, fake, args, 8)
        # The server stack alone (accept, parse, loop, route, respond): GET /healthz, 3 alternating rounds.
        client = lc.Client()
        for _ in range(3):
            for label, gw in gateways.items():

                async def healthz(gw: services.Service = gw) -> int:
                    status, _ = await client.request("GET", f"{gw.url}/healthz")
                    assert status == 200
                    return 1

                print(f"  /healthz c=8 {label} ...", flush=True)
                result = await _measure(
                    lambda healthz=healthz: lc.closed_loop(
                        healthz, concurrency=8, requests=args.requests * 10, max_seconds=args.point_seconds, warmup=50
                    ),
                    {"proxy": gw},
                )
                out.setdefault("_healthz_cpu_ms", {}).setdefault(label, []).append(result["cpu_ms_per_req"]["proxy"])
        await client.close()
        return out


async def workers(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(services.fake(work, model_time=0))
        gateways = {
            str(n): stack.enter_context(services.imagegate(work, fake.url, name=f"imagegate-w{n}", workers=n))
            for n in (1, 2)
        }
        return await _side_by_side(gateways, fake, args, 32)


async def inflight(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    timeout = args.model_time * 4 + 20
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(services.fake(work, model_time=args.model_time))
        gw = stack.enter_context(services.imagegate(work, fake.url, poll=0.5, poll_max=3.0))
        litellm = stack.enter_context(services.litellm(work, fake.url))
        for k in args.k:
            for name in ("direct (queue)", "direct (sync)", "imagegate (queue)", "litellm (sync)"):
                client = lc.Client(timeout=timeout)
                if name == "direct (sync)":
                    once = lc.direct_sync(client, fake.url)
                elif name.startswith("direct"):
                    once = lc.direct_queue(client, fake.url, poll=0.5, poll_max=3.0)
                elif name.startswith("imagegate"):
                    once = lc.openai_images(client, gw.url, extra={"response_format": "url"})
                else:
                    once = lc.openai_images(client, litellm.url)
                watched = {"fake": fake} | (
                    {} if name.startswith("direct") else {"proxy": gw if name.startswith("imagegate") else litellm}
                )
                print(f"  inflight K={k} {name} ...", flush=True)
                out.setdefault(name, {})[str(k)] = await _measure(
                    lambda once=once, k=k: lc.burst(once, k=k, timeout=timeout), watched
                )
                await client.close()
                await asyncio.sleep(1)
    return out


BASELINE_COMMIT = "f426a53"  # the tree measured by the previous report: the baseline of `instructions`
_INSTRUCTIONS = re.compile(r"fal (queue|sync) mode, c=1, passthrough: ([0-9.]+) M instructions per request")


def instructions(work: Path) -> dict[str, Any]:
    """bench/instructions.py on this tree and on BASELINE_COMMIT's (`git archive`), in one run."""

    def measure(src: Path | None) -> dict[str, float]:
        cmd = [sys.executable, str(ROOT / "bench" / "instructions.py"), *(["--src", str(src)] if src else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT).stdout
        return {mode: float(value) for mode, value in _INSTRUCTIONS.findall(out)}

    base = work / "baseline-tree"
    base.mkdir()
    archive = subprocess.run(["git", "archive", BASELINE_COMMIT], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    return {"current": measure(None), "baseline": measure(base / "src"), "baseline_commit": BASELINE_COMMIT}


SECTIONS = {"latency": latency, "fakes": fakes, "server": server_options, "workers": workers, "inflight": inflight}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts and ladders (about 4 min)")
    parser.add_argument(
        "--only", nargs="+", choices=[*SECTIONS, "burst", "conversions", "instructions"],
        help="run only these sections",
    )
    parser.add_argument("--no-report", action="store_true", help="keep BENCHMARKS.md as it is")
    args = parser.parse_args(argv)
    args.concurrency = [1, 8] if args.quick else [1, 8, 32]
    args.requests = 60 if args.quick else 200
    args.warmup = 10
    args.point_seconds = 8.0 if args.quick else 20.0
    args.model_time = 2.0 if args.quick else 5.0
    args.k = [100, 500] if args.quick else [100, 1000, 3000]
    chosen = args.only or [*SECTIONS, "burst", "conversions", "instructions"]

    RESULTS.mkdir(parents=True, exist_ok=True)
    latest = RESULTS / "latest.json"
    results: dict[str, Any] = json.loads(latest.read_text()) if latest.exists() and args.only else {}
    started = time.time()
    meta = {
        "machine": machine_line(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "bench/run_all.py" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
    }
    if args.only and "meta" in results:  # a partial re-run: say so next to the full run's data
        meta = results["meta"] | {
            "rerun": f"{' '.join(args.only)} re-run on {meta['date']} at {meta['commit']} ({meta['machine']})"
        }
    results["meta"] = meta
    services.ensure_bench_venv()
    with tempfile.TemporaryDirectory(prefix="imagegate-bench-") as tmp:
        for name in chosen:
            print(f"[{time.time() - started:5.0f} s] {name}", flush=True)
            if name == "burst":  # K=3000 and 10,000 through one process, vs a raw-socket client
                ladder = ["1000"] if args.quick else ["3000", "10000"]
                cmd = [sys.executable, str(ROOT / "bench" / "inflight_burst.py"), "--ladder", *ladder]
                if args.quick:
                    cmd += ["--model-seconds", "2"]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                results[name] = {
                    "command": " ".join(["bench/inflight_burst.py", *cmd[2:]]),
                    "exit": done.returncode,
                    "output": done.stdout[-6000:],
                }
                if not args.quick:  # the same 10,000 through `--workers 2`: what a second core buys
                    cmd = [sys.executable, str(ROOT / "bench" / "inflight_burst.py"), "--ladder", "10000",
                           "--workers", "2"]
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                    results["burst_workers"] = {
                        "command": " ".join(["bench/inflight_burst.py", *cmd[2:]]),
                        "exit": done.returncode,
                        "output": done.stdout[-6000:],
                    }
            elif name == "instructions":
                results[name] = instructions(Path(tmp))
            elif name == "conversions":
                cmd = [sys.executable, str(ROOT / "bench" / "conversions.py"), "--json"]
                if args.quick:
                    cmd.append("--quick")
                results[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            else:
                results[name] = asyncio.run(SECTIONS[name](Path(tmp), args))
            latest.write_text(json.dumps(results, indent=1))
    if not args.only:
        results["meta"]["seconds"] = time.time() - started
    latest.write_text(json.dumps(results, indent=1))
    if not args.no_report:
        subprocess.run(
            [str(services.BENCH_VENV / "bin" / "python"), str(ROOT / "bench" / "plots.py"), str(latest)], check=True
        )
        subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(latest)], check=True)
    print(f"done in {time.time() - started:.0f} s: {latest}, BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
