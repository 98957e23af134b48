"""What a converted output costs the gateway, next to a bare Pillow decode + encode of the same
bytes with the same settings, measured interleaved in the same run.

    .venv/bin/python bench/conversions.py [--quick] [--json]

Inputs: the 1024x1024 PNGs the benchmark fake serves (`photo`: photo-like, `flat`: one colour).
Outputs: webp, jpeg and avif with `output_compression` (the gateway's encoder settings: webp
method 2, avif speed 8, jpeg without optimize).

  in process   `emulate._finish` (everything delivery does to a provider's bytes: probe, decode,
               encode, base64) run through the gateway's ImagePool (the thread hop included), vs
               `Image.open(png).save(fmt, same settings)` + base64 on the calling thread.
  over HTTP    imagegate serving `b64_json` from the fake: p50 with `output_format` + compression
               minus p50 with `output_format=png` (same download, no conversion), vs the bare time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import leanclient as lc
from bench import services
from bench.fake_upstream import render
from PIL import Image

from imagegate.core import emulate, imaging

CASES = (("webp", 80), ("jpeg", 80), ("avif", 60))
_PILLOW = {"webp": {"method": 2}, "jpeg": {"optimize": False}, "avif": {"speed": 8}}


def bare(data: bytes, fmt: str, quality: int) -> str:
    im = Image.open(io.BytesIO(data))
    im.load()  # (without it, save() copies the decoded image once more: the bare baseline is the fast way)
    out = io.BytesIO()
    im.save(out, fmt.upper(), quality=quality, **_PILLOW[fmt])
    return base64.b64encode(out.getvalue()).decode()


def spec(fmt: str, quality: int) -> emulate.OutputSpec:
    return emulate.OutputSpec(
        format=fmt,
        size=None,
        compression=quality,
        background=None,
        response_format="b64_json",
        url_mode="rehost",
        max_pixels=40_000_000,
        ttl_seconds=60,
        public_base_url="http://x",
    )


async def in_process(repeats: int) -> dict[str, Any]:
    pool = imaging.ImagePool(2)
    out: dict[str, Any] = {}
    try:
        for kind in ("photo", "flat"):
            data = render(kind)
            for fmt, quality in CASES:
                gw, raw = [], []
                for i in range(repeats):  # interleaved, the order swapped every time: drift hits both alike
                    for side in ("gateway", "bare") if i % 2 else ("bare", "gateway"):
                        started = time.perf_counter()
                        if side == "gateway":
                            await pool.run(emulate._finish, data, spec(fmt, quality))
                            gw.append(time.perf_counter() - started)
                        else:
                            bare(data, fmt, quality)
                            raw.append(time.perf_counter() - started)
                g, b = statistics.median(gw) * 1000, statistics.median(raw) * 1000
                g_min, b_min = min(gw) * 1000, min(raw) * 1000  # the runs least disturbed by other jobs
                out[f"{kind} {fmt}"] = {
                    "gateway_ms": g,
                    "bare_ms": b,
                    "ratio": g / b,
                    "gateway_min_ms": g_min,
                    "bare_min_ms": b_min,
                    "ratio_min": g_min / b_min,
                }
    finally:
        pool.close()
    return out


async def over_http(repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind in ("photo", "flat"):
            data = render(kind)
            with (
                services.fake(work, model_time=0, image=kind, name=f"fake-{kind}") as fake,
                services.imagegate(work, fake.url, name=f"imagegate-{kind}") as gw,
            ):
                client = lc.Client()
                plain = lc.openai_images(client, gw.url, extra={"response_format": "b64_json", "output_format": "png"})
                for _ in range(5):
                    await plain()
                for fmt, quality in CASES:
                    converted = lc.openai_images(
                        client,
                        gw.url,
                        extra={"response_format": "b64_json", "output_format": fmt, "output_compression": quality},
                    )
                    await converted()
                    times: dict[str, list[float]] = {"plain": [], "converted": [], "bare": []}
                    for _ in range(repeats):
                        for name, call in (("plain", plain), ("converted", converted)):
                            started = time.perf_counter()
                            await call()
                            times[name].append(time.perf_counter() - started)
                        started = time.perf_counter()
                        bare(data, fmt, quality)
                        times["bare"].append(time.perf_counter() - started)
                    med = {name: statistics.median(values) * 1000 for name, values in times.items()}
                    added = med["converted"] - med["plain"]
                    out[f"{kind} {fmt}"] = {
                        "plain_ms": med["plain"],
                        "converted_ms": med["converted"],
                        "added_ms": added,
                        "bare_ms": med["bare"],
                        "ratio": added / med["bare"],
                    }
                await client.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = parser.parse_args(argv)
    repeats = 9 if args.quick else 21
    results = {"in_process": asyncio.run(in_process(repeats)), "over_http": asyncio.run(over_http(repeats))}
    if args.json:
        print(json.dumps(results))
        return 0
    for section, rows in results.items():
        print(section)
        for name, row in rows.items():
            print(f"  {name:11} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
