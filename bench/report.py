# ruff: noqa: RUF001  (the multiplication sign is meant)
"""Write BENCHMARKS.md from bench/results/latest.json (see bench/run_all.py)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CMD = ".venv/bin/python bench/run_all.py"


def _f(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def targets(r: dict[str, Any]) -> list[str]:
    lines = ["| target | figure (same run) | |", "|---|---|---|"]
    lat = r.get("latency", {})
    if lat:
        c1 = {name: points.get("1", {}) for name, points in lat.items()}
        add_q = c1["imagegate (queue)"]["p50_ms"] - c1["direct (queue)"]["p50_ms"]
        add_s = c1["imagegate (sync)"]["p50_ms"] - c1["direct (sync)"]["p50_ms"]
        add_l = c1["litellm (sync)"]["p50_ms"] - c1["direct (sync)"]["p50_ms"]
        lines.append(
            f"| added p50 at c=1 ≤ 1.5 ms over a direct fal call | imagegate queue mode +{_f(add_q, 2)} ms, "
            f"sync mode +{_f(add_s, 2)} ms (LiteLLM +{_f(add_l, 2)} ms) | {_met(max(add_q, add_s) <= 1.5)} |"
        )
        share = max(add_q, add_s) / add_l if add_l > 0 else math.inf
        lines.append(f"| ≤ ¼ of LiteLLM's added latency | {_f(share, 2)}× of LiteLLM's | {_met(share <= 0.25)} |")
        for c in ("8", "32"):
            gw, ll = lat["imagegate (queue)"].get(c), lat["litellm (sync)"].get(c)
            gws = lat["imagegate (sync)"].get(c)
            if gw and ll:
                ratio = gw["rps"] / ll["rps"]
                ratio_s = gws["rps"] / ll["rps"] if gws else math.nan
                lines.append(
                    f"| c={c}: ≥ 2× LiteLLM's throughput, lower p99 | queue {_f(gw['rps'])} req/s ({_f(ratio, 2)}×), "
                    f"sync {_f(gws['rps'] if gws else math.nan)} req/s ({_f(ratio_s, 2)}×) vs LiteLLM {_f(ll['rps'])}; "
                    f"p99 {_f(gw['p99_ms'])} / {_f(gws['p99_ms'] if gws else math.nan)} vs {_f(ll['p99_ms'])} ms | "
                    f"{_met(min(ratio, ratio_s) >= 2 and max(gw['p99_ms'], gws['p99_ms']) < ll['p99_ms'])} |"
                )
    wk = r.get("workers", {})
    if wk.get("1") and wk.get("2"):
        w1, w2 = wk["1"], wk["2"]
        slower = w2["1"]["p50_ms"] - w1["1"]["p50_ms"]
        lines.append(
            f"| `--workers 2` never slower at c=1 | p50 {_f(w2['1']['p50_ms'], 2)} vs {_f(w1['1']['p50_ms'], 2)} ms "
            f"({slower:+.2f} ms) | {_met(slower <= max(0.5, 0.1 * w1['1']['p50_ms']))} |"
        )
        lines.append(
            f"| throughput grows 1 → 2 workers (c=32) | {_f(w1['32']['rps'])} → {_f(w2['32']['rps'])} req/s "
            f"({_f(w2['32']['rps'] / w1['32']['rps'], 2)}×) on 2 cores shared with the fake and the client | |"
        )
    conv = r.get("conversions", {}).get("in_process", {})
    if conv:
        worst = max(row["ratio"] for row in conv.values())
        worst_min = max(row.get("ratio_min", math.nan) for row in conv.values())
        lines.append(
            f"| a conversion costs ≤ 1.15× a bare Pillow decode + encode | worst case {_f(worst, 2)}× on medians "
            f"({_f(worst_min, 2)}× on the fastest of each side's runs; in process, table below) | "
            f"{_met(worst <= 1.15)} |"
        )
    inf = r.get("inflight", {})
    if inf:
        for k in sorted(inf.get("imagegate (queue)", {}), key=int):
            gw, direct = inf["imagegate (queue)"][k], inf["direct (queue)"][k]
            ratio = gw["wall_s"] / direct["wall_s"]
            lines.append(
                f"| K={k} in flight: 100 % succeed, wall ≤ 1.3× direct | {gw['ok']}/{k} in {_f(gw['wall_s'])} s "
                f"vs direct {direct['ok']}/{k} in {_f(direct['wall_s'])} s ({_f(ratio, 2)}×) | "
                f"{_met(gw['ok'] == int(k) and ratio <= 1.3)} |"
            )
    burst = r.get("burst", {})
    for k, ratio, rss, p99, verdict in _BURST.findall(burst.get("output", "")):
        lines.append(
            f"| K={int(k):,} in flight (`inflight_burst.py`): 100 % succeed, wall ≤ 1.3× direct, RSS ≤ 1 GB, "
            f"/healthz p99 ≤ 100 ms | wall {ratio}× direct, RSS {rss} MiB, /healthz p99 {p99} ms | "
            f"{_met(verdict == 'MET')} |"
        )
    ins = r.get("instructions", {})
    if ins.get("current") and ins.get("baseline"):
        cur, base = ins["current"], ins["baseline"]
        lines.append(
            "| instructions per c=1 request (callgrind; not a target, the steady figure) | "
            + ", ".join(
                f"{mode} mode {cur[mode]:.2f} M vs {base[mode]:.2f} M at `{ins['baseline_commit']}` "
                f"({cur[mode] / base[mode]:.2f}×)"
                for mode in ("queue", "sync")
                if mode in cur and mode in base
            )
            + " | |"
        )
    return lines


_BURST = re.compile(
    r"K=(\d+): wall gateway/direct ([0-9.]+) .*?RSS ([0-9.]+) MiB .*?healthz p99 ([0-9.]+) ms .*?: (MET|NOT MET)"
)


def load_table(section: dict[str, Any], key_name: str) -> list[str]:
    lines = [
        f"| target | {key_name} | ok | errors | p50 ms | p99 ms | req/s | proxy ms CPU/req | fake ms CPU/req "
        "| client ms CPU/req |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, points in section.items():
        for key in sorted(points, key=int):
            p = points[key]
            if "ok" not in p:
                continue
            cpu = p["cpu_ms_per_req"] if p["ok"] else {}  # (per request: meaningless when none succeeded)
            fake = sum(v for k, v in cpu.items() if k.startswith("fake")) if cpu else math.nan
            lines.append(
                f"| {name} | {key} | {p['ok']} | {p['errors']} | {_f(p['p50_ms'], 2)} | {_f(p['p99_ms'], 2)} | "
                f"{_f(p['rps'])} | {_f(cpu.get('proxy', math.nan), 2)} | {_f(fake, 2)} | "
                f"{_f(p['client_cpu_ms_per_req'] if p['ok'] else math.nan, 2)} |"
            )
    return lines


def render(r: dict[str, Any]) -> str:
    meta = r["meta"]
    out = [
        "# Benchmarks",
        "",
        f"Generated by `{CMD}{' --quick' if meta.get('quick') else ''}` on {meta['date']} at commit "
        f"`{meta['commit']}` ({_f(meta.get('seconds', math.nan), 0)} s). Machine: {meta['machine']}. "
        "The machine is shared: absolute numbers drift, compare within a run."
        + (f" Sections {meta['rerun']}." if meta.get("rerun") else ""),
        "",
        "Every server is a process of its own on 127.0.0.1: the lean fake fal (`bench/fake_upstream.py`, "
        "configurable model time, a pre-rendered 1024² PNG), `imagegate serve` (the real CLI, fal pointed at the "
        "fake, URL passthrough), and LiteLLM's proxy (`litellm[proxy]==1.100.5` in bench/.venv, model "
        "`fal_ai/fal-ai/qwen-image`, `api_base` = the fake's sync-run URL with the model path). The load client "
        "(`bench/leanclient.py`) is a keep-alive HTTP/1.1 client on asyncio streams; *direct* is that client "
        "speaking fal's protocol to the fake itself: the physical baseline. imagegate runs in fal queue mode "
        "(submit, status, result: 3 upstream calls) and in fal sync mode (1 call, as LiteLLM does).",
        "",
        "## Targets",
        "",
        *targets(r),
        "",
        "![latency vs concurrency](bench/results/latency.png)",
        "",
        "![success and wall vs in-flight K](bench/results/inflight.png)",
        "",
    ]
    if "latency" in r:
        out += [
            "## Latency and throughput (zero model time)",
            "",
            f"Command: `{CMD} --only latency`. c=1 is "
            "interleaved request by request over all five targets (drift hits them alike); req/s at c=1 is "
            "1 / mean latency.",
            "",
            *load_table(r["latency"], "c"),
            "",
        ]
    if "fakes" in r:
        out += [
            "## Is the fake or the client the bottleneck?",
            "",
            "The direct queue client at c=32 against one fake process, then spread over two. If two fakes do "
            "not raise throughput, one fake was not the limit; the client's and the fake's CPU per request "
            "(tables) are small next to the proxies'.",
            "",
            *load_table({k: {"32": v} for k, v in r["fakes"].items()}, "c"),
            "",
        ]
    if "server" in r:
        out += [
            "## Server: asyncio + h11 vs uvloop + httptools",
            "",
            f"Command: `{CMD} --only server`. Both "
            "servers run at the same time; c=1 is interleaved request by request.",
            "",
            *load_table(
                {k: v for k, v in r["server"].items() if not k.startswith("_") and "unavailable" not in v}, "c"
            ),
            "",
            "The server stack alone (accept, parse, route, respond), `GET /healthz` at c=8, 3 alternating rounds, "
            "ms of the gateway's CPU per request: "
            + "; ".join(
                f"{k}: {', '.join(_f(x, 3) for x in v)}" for k, v in r["server"].get("_healthz_cpu_ms", {}).items()
            )
            + ".",
            "",
        ]
    if "workers" in r:
        wk = r["workers"]
        note = ""
        if wk.get("1", {}).get("32") and wk.get("2", {}).get("32"):
            w1, w2 = wk["1"]["32"], wk["2"]["32"]
            note = (
                f"Why the gain from a second worker is bounded here: one worker needs "
                f"{_f(w1['cpu_ms_per_req']['proxy'], 2)} ms of CPU per request, so one core caps it near "
                f"{_f(1000 / w1['cpu_ms_per_req']['proxy'])} req/s; two workers can use the second core only as far "
                "as the fake, the load client and the rest of the machine leave it free (2 cores in all, shared "
                f"with other jobs: load average at the start {meta['machine'].rsplit('load average ', 1)[-1]}). "
                f"Two workers spent {_f(w2['cpu_ms_per_req']['proxy'], 2)} ms per request. On a machine with more "
                "cores than the gateway's CPU per request needs, throughput grows with N until the upstream or "
                "the network is the limit. Counters in Redis (limits, usage) are shared by all workers; the "
                "connection cap and the image pool are per worker."
            )
        out += [
            "## Workers",
            "",
            f"Command: `{CMD} --only workers`. `imagegate serve --workers 1` and `--workers 2` "
            "run at the same time; c=1 is interleaved request by request, c=32 runs one after the other.",
            "",
            *load_table({f"workers={k}": v for k, v in r["workers"].items()}, "c"),
            "",
            note,
            "",
        ]
    if "inflight" in r:
        out += [
            "## Requests in flight",
            "",
            f"Command: `{CMD} --only inflight`. K requests sent at once, model "
            "time as configured; imagegate runs its real defaults (the fal status stream, after one status "
            "check while that pays for the model), the direct client polls (0.5 s, backing off to 3 s), "
            "LiteLLM holds one sync call per "
            "request. K = 3,000 and 10,000 with "
            "the gateway's RSS, /healthz and upstream requests per job: the next section (`bench/inflight_burst.py`).",
            "",
            *load_table(r["inflight"], "K"),
            "",
        ]
    burst = r.get("burst")
    if burst:
        out += [
            "## 3,000 and 10,000 in flight (bench/inflight_burst.py)",
            "",
            f"Command: `.venv/bin/python {burst['command']}` (exit status {burst['exit']}: 0 means every target "
            "of the script was met). Its own output:",
            "",
            "```",
            burst["output"].strip(),
            "```",
            "",
        ]
    burst_workers = r.get("burst_workers")
    if burst_workers:
        out += [
            "The same 10,000 through `imagegate serve --workers 2` (two processes; the one-process target "
            "does not apply, this shows what a second core buys while the fake and the load client share "
            f"the same two cores). Command: `.venv/bin/python {burst_workers['command']}`:",
            "",
            "```",
            burst_workers["output"].strip(),
            "```",
            "",
        ]
    conv = r.get("conversions")
    if conv:
        out += [
            "## Conversions",
            "",
            "Command: `.venv/bin/python bench/conversions.py`. 1024² PNG in (photo-like "
            "and flat), output with `output_compression`; bare = `Image.open` + `load` + `save` with the same "
            "encoder settings + base64, interleaved with the gateway's run in the same process.",
            "",
            "| image, format | gateway ms (median) | bare ms (median) | ratio | gateway ms (fastest) "
            "| bare ms (fastest) | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {k} | {_f(v['gateway_ms'])} | {_f(v['bare_ms'])} | {_f(v['ratio'], 2)} | "
            f"{_f(v.get('gateway_min_ms', math.nan))} | {_f(v.get('bare_min_ms', math.nan))} | "
            f"{_f(v.get('ratio_min', math.nan), 2)} |"
            for k, v in conv["in_process"].items()
        ]
        out += [
            "",
            "Over HTTP (imagegate `b64_json` from the fake, p50): converted minus unconverted (`png`), vs bare.",
            "",
            "| image, format | unconverted ms | converted ms | added ms | bare ms | added / bare |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {k} | {_f(v['plain_ms'])} | {_f(v['converted_ms'])} | {_f(v['added_ms'])} | {_f(v['bare_ms'])} | "
            f"{_f(v['ratio'], 2)} |"
            for k, v in conv["over_http"].items()
        ]
        out.append("")
    out += [
        "## Reading the results",
        "",
        "- **CPU per request is the steady figure** on a shared machine; latencies move with the load of other "
        "jobs (load average above). At c=1 the targets are interleaved request by request, so drift hits them alike.",
        "- **Added latency and throughput vs LiteLLM.** The gateway's own CPU per request (column *proxy*) is what "
        "bounds both: compare imagegate's sync mode (one upstream call, like LiteLLM) with LiteLLM. Queue mode makes "
        "three upstream calls per job (submit, status, result) and pays for them. What is left per request "
        "(callgrind, `--only instructions`: the targets table) is spread over the two HTTP hops: the "
        "upstream calls (the gateway's own HTTP/1.1 client since 2026-11-30, `upstream_wire.py`: about 60 us of CPU "
        "per call behind httpx's API, where aiohttp took 105 us on its own API and 304 us behind httpx's, "
        "bench/README.md, \"The candidates\"; queue mode minus sync mode is two more calls), "
        "uvicorn's protocol and our four middlewares, and the kernel's work for each socket write (not counted "
        "by callgrind; on loopback a write also runs the receiver's side of TCP). FastAPI's routing and "
        "exception layers are no longer on the image routes (`api/hot_routes.py`).",
        "- **In flight.** Polling costs 5-8 upstream requests per 5 s job; the fal status stream (the default) costs "
        "one. The status is asked once before the stream only while that pays for the model (`FirstLook` in "
        "`providers/fal/status.py`: for a 5 s model it stops after the first ~36 jobs). Open streams are capped at "
        "a quarter of the open-file limit less 1,000 (4,000 with this machine's 20,000, which also hold the "
        "client connections), so at K = 10,000 a job that finds every slot taken polls until a slot frees up, then "
        "takes the stream (columns *polls/job*, *streams/job*): about 5 upstream requests per job there, 3-4 at "
        "K = 3,000, against the direct client's 8. LiteLLM holds one "
        "sync call per job; a job that has not finished after 4× the model time + 20 s counts as failed.",
        "- **K = 10,000 in one process.** On 2026-11-29 (`f426a53`) the gateway spent about 1.6 ms of CPU per job "
        "(column *gw CPU* of the burst table divided by K) and took 1.9× the direct client's wall time; 3,000 "
        "fired at one instant (`--only inflight`) took 1.38×. The upstream client was the largest part of a py-spy "
        "profile (aiohttp's request and response machinery about a quarter, its connection setup 5 %). With "
        "`upstream_wire.py`, the learned first status look and streams taken as slots free up (every job then "
        "streams: column *streams/job*), the gateway spends about 1 ms per job and both meet 1.3×: at K = 10,000 "
        "0.90-1.25× over the eight runs of this code (this report's among them), the spread being the shared "
        "machine's. What is left per job: socket writes on both hops (about a fifth of a py-spy profile: on "
        "loopback a write also runs the receiver's side of TCP), the event loop itself (~15 %), uvicorn's protocol "
        "(~10 %) and the gateway's own request handling, no item above 4 %. `/healthz` is answered in the read "
        "callback, so its latency is the length of the event-loop iteration it arrives in: the faster a burst is "
        "worked through, the more callbacks an iteration holds (28-75 ms at p99 in these runs, once 154 ms; "
        "`--workers 2`, whose two processes share the two cores with the fake and the client, above 100 ms).",
        "- **Is the harness the bottleneck?** The load client and the fake use a fraction of a millisecond of CPU "
        "per request (columns *client* and *fake*) against several milliseconds for either proxy, and a second fake "
        "process changes the direct client's throughput little.",
        "- **Conversions.** In process, the gateway's conversion runs the same decoder and encoder with the same "
        "settings as the bare Pillow call, plus a probe of the input header, a hop to the image pool's thread and "
        "base64. The fixed part (the hop: waking a thread on a busy 2-core machine) weighs most on the cheapest "
        "cases (a flat image), and AVIF's encoder runs threads of its own, so its time varies most with the load.",
        "",
    ]
    drain = ROOT / "bench" / "results" / "jobs_drain.md"  # measured by the test suite's drain, kept as written
    if drain.exists():
        out += [drain.read_text("utf-8").rstrip(), ""]
    return "\n".join(out) + "\n"


def main() -> int:
    results = json.loads(Path(sys.argv[1]).read_text())
    (ROOT / "BENCHMARKS.md").write_text(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
