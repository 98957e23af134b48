"""Draw the suite's plots from bench/results/latest.json (run in bench/.venv, which has matplotlib).

    bench/.venv/bin/python bench/plots.py bench/results/latest.json

Writes bench/results/latency.png (p50 and p99 latency vs concurrency) and inflight.png (success
rate and wall time vs requests in flight), one line per target.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUT = Path(__file__).resolve().parent / "results"


def latency(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in results.items():
        cs = sorted(int(c) for c in points)
        for ax, key in zip(axes, ("p50_ms", "p99_ms"), strict=True):
            ax.plot(cs, [points[str(c)][key] for c in cs], marker="o", label=name)
    for ax, title in zip(axes, ("p50", "p99"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{title} latency, zero model time")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def inflight(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in results.items():
        ks = sorted(int(k) for k in points)
        success = [100 * points[str(k)]["ok"] / k for k in ks]
        axes[0].plot(ks, success, marker="o", label=name)
        axes[1].plot(ks, [points[str(k)]["wall_s"] for k in ks], marker="o", label=name)
    axes[0].set_ylabel("succeeded (%)")
    axes[0].set_ylim(0, 105)
    axes[1].set_ylabel("wall time of the burst (s)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("requests in flight (all sent at once)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("success vs in-flight K")
    axes[1].set_title("wall vs in-flight K")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    results = json.loads(Path(sys.argv[1]).read_text())
    if "latency" in results:
        latency(results["latency"], OUT / "latency.png")
    if "inflight" in results:
        inflight(results["inflight"], OUT / "inflight.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
