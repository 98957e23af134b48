"""The gateway's instructions per request (callgrind), a figure other processes' load cannot move.

    .venv/bin/python bench/instructions.py                       # queue and sync mode, 300 requests each
    .venv/bin/python bench/instructions.py --src /tmp/old/src    # the same for another source tree

`imagegate serve` (the real CLI, fal pointed at the lean fake, URL passthrough, no job workers so
no background polling is counted) runs under `valgrind --tool=callgrind --instr-atstart=no`; after
a warm-up the client switches instrumentation on (`callgrind_control -i on`), sends N requests one
at a time, and switches it off. Reported: user-space instructions per request (system calls are
not counted: compare with the CPU time per request of `run_all.py --only latency`).
Needs valgrind; each mode takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import leanclient as lc
from bench import services


async def measure(mode: str, requests: int, src: str | None, work: Path, fake_url: str) -> float:
    port = services.free_port()
    config = work / f"{mode}.yaml"
    config.write_text(services.imagegate_config(fake_url, work / f"{mode}-images", mode=mode) + "jobs: {workers: 0}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGATE_", "FAL_"))}
    if src:
        env["PYTHONPATH"] = src
    out = work / f"callgrind-{mode}.out"
    cmd = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        services.PYTHON, "-m", "imagegate.cli", "serve", "--config", str(config), "--port", str(port),
    ]
    log = work / f"{mode}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        services._wait_http(f"http://127.0.0.1:{port}/healthz", proc, log, 600)
        client = lc.Client(timeout=120)
        once = lc.openai_images(client, f"http://127.0.0.1:{port}", extra={"response_format": "url"})
        for _ in range(30):
            await once()
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        for _ in range(requests):
            await once()
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
        await client.close()
    finally:
        proc.send_signal(2)
        proc.wait(120)
    totals = [line for line in out.read_text().splitlines() if line.startswith("totals:")]
    return int(totals[-1].split()[1]) / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--requests", type=int, default=300)
    parser.add_argument("--modes", nargs="+", default=["queue", "sync"], choices=["queue", "sync"])
    parser.add_argument("--src", help="run the gateway from this source tree (PYTHONPATH) instead")
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="imagegate-instr-") as tmp, services.fake(Path(tmp), model_time=0) as fake:
        for mode in args.modes:
            per = asyncio.run(measure(mode, args.requests, args.src, Path(tmp), fake.url))
            print(f"fal {mode} mode, c=1, passthrough: {per / 1e6:.3f} M instructions per request", flush=True)
    print(f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
