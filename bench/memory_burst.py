"""A burst of large concurrent edits: how much memory does the gateway take, and give back?

Runs the real `imagegate serve` (sandbox provider, storage in a temporary directory) in its own
process, fires K concurrent multipart edits of one incompressible PNG of about --image-mb MB
(`prompt=grayscale`, `response_format=b64_json`), and samples the server's VmRSS from
/proc/<pid>/status every 20 ms. Reported per phase: status counts, wall time, RSS before the burst,
peak, and `--settle` seconds after the last answer.

Phases (each a fresh server process, same image, same K):

  unbounded   the in-flight budget effectively off (limits.max_inflight_requests/bytes huge) and
              no malloc_trim: the gateway as it was before the budget
  budget      the packaged defaults (limits.max_inflight_bytes etc.)
  no-trim     the defaults without malloc_trim (limits.trim_after_bytes: 0), to see what it gives back

    .venv/bin/python bench/memory_burst.py                 # K = 200 and 400, ~6 min on 2 cores
    .venv/bin/python bench/memory_burst.py -k 200 --image-mb 5
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
UNBOUNDED = {"max_inflight_requests": 10**9, "max_inflight_bytes": 2**62, "trim_after_bytes": 0}


def noise_png(megabytes: float) -> bytes:
    side = int((megabytes * 1e6 / 3) ** 0.5)
    img = Image.frombytes("RGB", (side, side), random.Random(7).randbytes(side * side * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: Path, limits: dict[str, Any]) -> tuple[subprocess.Popen[bytes], str]:
    config = {
        "limits": limits,
        "storage": {"path": str(tmp / "images")},
        "providers": {"fal": {"key": ""}, "replicate": {"api_token": ""}, "openai": {"api_key": ""}},
    }
    path = tmp / "config.yaml"
    defaults = yaml.safe_load((ROOT / "src/imagegate/defaults/imagegate.yaml").read_text())
    for key, value in config.items():
        defaults[key] = {**(defaults.get(key) or {}), **value}
    path.write_text(yaml.safe_dump(defaults))
    port = free_port()
    exe = Path(sys.executable).with_name("imagegate")
    proc = subprocess.Popen(
        [str(exe), "serve", "--config", str(path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the gateway did not start")


async def burst(url: str, image: bytes, k: int, timeout: float) -> tuple[collections.Counter[int], float]:
    limits = httpx.Limits(max_connections=k + 10, max_keepalive_connections=k + 10)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one() -> int:
            try:
                r = await client.post(
                    "/v1/images/edits",
                    data={"model": "sandbox-edit", "prompt": "grayscale", "response_format": "b64_json"},
                    files={"image": ("noise.png", image, "image/png")},
                )
                return r.status_code
            except httpx.HTTPError:
                return -1

        start = time.monotonic()
        codes = collections.Counter(await asyncio.gather(*(one() for _ in range(k))))
        return codes, time.monotonic() - start


def phase(name: str, limits: dict[str, Any], image: bytes, k: int, settle: float, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp), limits)
        try:
            time.sleep(0.5)
            before = rss_bytes(proc.pid)
            peak = [before]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_bytes(proc.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            codes, wall = asyncio.run(burst(url, image, k, timeout))
            time.sleep(settle)
            stop.set()
            sampler.join()
            after = rss_bytes(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
    mib = 1024 * 1024
    row = {"phase": name, "k": k, "codes": dict(codes), "wall": wall, "before": before / mib,
           "peak": peak[0] / mib, "after": after / mib}  # fmt: skip
    print(
        f"{name:10s} K={k:4d}  {dict(sorted(codes.items()))}  wall {wall:6.1f} s  RSS before {row['before']:.0f} MiB"
        f"  peak {row['peak']:.0f} MiB  after {settle:.0f} s {row['after']:.0f} MiB",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", type=int, nargs="+", default=[200, 400], help="concurrent edits per burst")
    parser.add_argument("--image-mb", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after the burst before RSS is read")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request client timeout")
    parser.add_argument("--only", choices=["unbounded", "budget", "no-trim"], help="run one phase only")
    args = parser.parse_args()
    image = noise_png(args.image_mb)
    print(f"image: {len(image) / 1e6:.2f} MB PNG; cpus {os.cpu_count()}; load {os.getloadavg()[0]:.2f}", flush=True)
    for k in args.k:
        if args.only in (None, "unbounded"):
            phase("unbounded", UNBOUNDED, image, k, args.settle, args.timeout)
        if args.only in (None, "budget"):
            phase("budget", {}, image, k, args.settle, args.timeout)
        if args.only in (None, "no-trim"):
            phase("no-trim", {"trim_after_bytes": 0}, image, k, args.settle, args.timeout)


if __name__ == "__main__":
    main()
