"""Does CPU image work stay off the event loop? And what do the encoder settings buy?

Part 1, event-loop lag. The gateway runs in process (httpx.ASGITransport, lifespan included) on
this script's event loop. A ticker task sleeps 10 ms at a time and records how late each wake-up
is. Three measurements, all in this run:

  baseline  the ticker alone, for as long as the loaded phase took
  loaded    the ticker while K concurrent sandbox edits run through the gateway, each a multipart
            upload of a 2048x2048 PNG answered as AVIF (b64_json): decode, sepia + mirror, PNG
            render, AVIF encode, base64 -- all of it in the gateway's image pool, if the design
            holds
  control   the ticker while ONE 2048x2048 AVIF encode runs directly on the event loop: what the
            lag looks like when image work does block the loop (shows the ticker can see it)

It reports max and p99 lag and the ratio loaded/baseline. A loaded max lag far below the control's
means the image work is not on the loop.

Part 2, encoder settings. imagegate.core.imaging.encode_image (the gateway's settings) against
Pillow's Image.save defaults, PNG and AVIF, on a 1024x1024 synthetic image: median time and size
over --encode-repeats runs, as ratios configured/default.

    .venv/bin/python bench/event_loop.py                  # ~30 s
    .venv/bin/python bench/event_loop.py -k 8 --edits 32 --max-seconds 120
    .venv/bin/python bench/event_loop.py --diagnose       # which code held the loop when it lagged

Bounded: at most --edits edits and --max-seconds per phase; nothing leaves this process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from bench._common import (
    fmt_ms,
    machine_line,
    percentile,
    photo_like,
    ratio,
    sandbox_gateway_settings,
)
from PIL import Image

from imagegate.app import create_app
from imagegate.core.imaging import encode_image

TICK = 0.010
SLOW = 0.005  # --diagnose: lag above this is attributed to what the loop thread was doing
PROMPT = "sepia and mirror"


# ------------------------------------------------------------------------------------------------
# The ticker


@dataclass
class Lag:
    name: str
    lags: list[float] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""
    windows: list[tuple[float, float]] = field(default_factory=list)  # late wake-ups (> SLOW)

    @property
    def max(self) -> float:
        return max(self.lags, default=float("nan"))

    def p(self, q: float) -> float:
        return percentile(self.lags, q)


async def _tick(lag: Lag, stop: asyncio.Event) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(TICK)
        t1 = time.perf_counter()
        lag.lags.append(max(0.0, t1 - t0 - TICK))
        if t1 - t0 - TICK > SLOW:
            lag.windows.append((t0 + TICK, t1))


@contextlib.asynccontextmanager
async def ticking(name: str) -> AsyncIterator[Lag]:
    lag = Lag(name)
    stop = asyncio.Event()
    task = asyncio.create_task(_tick(lag, stop))
    await asyncio.sleep(0)  # the ticker is running before the measured work starts
    start = time.perf_counter()
    try:
        yield lag
    finally:
        lag.seconds = time.perf_counter() - start
        stop.set()
        await task


class LoopSampler:
    """--diagnose only: samples the event-loop thread's Python stack every `interval` seconds from
    another thread, so late wake-ups of the ticker can be attributed to the code that held the loop.
    (Sampling takes the GIL too, so it perturbs the numbers a little; it is off by default.)"""

    def __init__(self, interval: float = 0.001, max_seconds: float = 300.0) -> None:
        self.interval = interval
        self.max_seconds = max_seconds
        self.loop_thread = threading.get_ident()
        self.samples: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop-sampler", daemon=True)

    def __enter__(self) -> LoopSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        deadline = time.perf_counter() + self.max_seconds
        while not self._stop.wait(self.interval) and time.perf_counter() < deadline:
            frame = sys._current_frames().get(self.loop_thread)
            if frame is not None:
                self.samples.append((time.perf_counter(), _where(frame)))

    def blame(self, windows: list[tuple[float, float]]) -> Counter[str]:
        counts: Counter[str] = Counter()
        i = 0
        for start, end in sorted(windows):
            while i < len(self.samples) and self.samples[i][0] < start:
                i += 1
            j = i
            while j < len(self.samples) and self.samples[j][0] <= end:
                counts[self.samples[j][1]] += 1
                j += 1
        return counts


def _where(frame: FrameType) -> str:
    """`innermost function <- nearest frame of imagegate (or of this script)`."""
    inner = frame
    if inner.f_code.co_name == "select" and inner.f_code.co_filename.endswith("selectors.py"):
        return "loop idle in select(): the loop thread was waiting for the GIL/CPU, not working"
    ours: FrameType | None = frame
    while ours is not None and "/imagegate/" not in ours.f_code.co_filename \
            and "/bench/" not in ours.f_code.co_filename:
        ours = ours.f_back
    here = f"{inner.f_code.co_name} ({Path(inner.f_code.co_filename).name}:{inner.f_lineno})"
    if ours is None or ours is inner:
        return here
    return f"{here} <- {ours.f_code.co_name} ({Path(ours.f_code.co_filename).name}:{ours.f_lineno})"


# ------------------------------------------------------------------------------------------------
# Part 1


async def loaded_phase(client: httpx.AsyncClient, png: bytes, *, concurrency: int, edits: int,
                       max_seconds: float, size: int, diagnose: bool = False,
                       verify: bool = False) -> tuple[Lag, int, float]:
    """The ticker while `edits` edits run `concurrency` at a time. Returns (lag, done, cpu seconds)."""
    issued = done = 0
    deadline = time.perf_counter() + max_seconds
    form = {"model": "sandbox-edit", "prompt": PROMPT, "output_format": "avif", "response_format": "b64_json"}

    async def worker() -> None:
        nonlocal issued, done
        while issued < edits and time.perf_counter() < deadline:
            issued += 1
            response = await client.post("/v1/images/edits", data=form,
                                          files={"image": ("input.png", png, "image/png")})
            if response.status_code != 200:
                raise RuntimeError(f"edit failed: {response.status_code} {response.text[:300]}")
            item = response.json()["data"][0]
            # Only the AVIF signature is checked on the loop (the full check runs once, off the
            # timed phase): the client's own work should not be counted as the gateway's lag.
            if base64.b64decode(item["b64_json"][:16])[4:12] != b"ftypavif":
                raise RuntimeError("the output is not AVIF")
            if verify:
                with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as image:
                    if image.format != "AVIF" or image.size != (size, size):
                        raise RuntimeError(f"unexpected output {image.format} {image.size}")
            done += 1

    cpu0 = time.process_time()
    with LoopSampler(max_seconds=max_seconds + 60) if diagnose else contextlib.nullcontext() as sampler:
        async with ticking("loaded") as lag:
            async with asyncio.timeout(max_seconds + 60):  # a stuck request cannot hang the benchmark
                await asyncio.gather(*(worker() for _ in range(concurrency)))
    lag.note = f"{done} edits, K={concurrency}"
    if sampler is not None:
        blamed = sampler.blame(lag.windows)
        total = sum(blamed.values()) or 1
        print(f"  diagnose: {len(lag.windows)} wake-ups later than {SLOW * 1000:.0f} ms; "
              f"loop-thread samples inside them ({total}):")
        for where, count in blamed.most_common(12):
            print(f"    {100 * count / total:5.1f}%  {where}")
    return lag, done, time.process_time() - cpu0


async def idle_phase(seconds: float) -> Lag:
    async with ticking("baseline") as lag:
        await asyncio.sleep(seconds)
    lag.note = "no load"
    return lag


async def control_phase(image: Image.Image) -> Lag:
    """One AVIF encode ON the event loop (deliberately wrong), between two ticks."""
    async with ticking("control") as lag:
        await asyncio.sleep(5 * TICK)
        t0 = time.perf_counter()
        encode_image(image, "avif", None)  # blocks the loop: this is the point of the control
        blocked = time.perf_counter() - t0
        await asyncio.sleep(5 * TICK)
    lag.note = f"one {image.width}x{image.height} AVIF encode on the loop ({fmt_ms(blocked)})"
    return lag


async def part1(args: argparse.Namespace, image: Image.Image, png: bytes) -> list[Lag]:
    with tempfile.TemporaryDirectory(prefix="imagegate-bench-") as storage_dir:
        settings = sandbox_gateway_settings(storage_dir)
        if args.image_workers is not None:
            settings = settings.model_copy(update={"image_workers": args.image_workers})
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=120) as client:
                # Warm-up (imports, first AVIF encoder init, pool threads), not measured.
                await loaded_phase(client, png, concurrency=1, edits=1, max_seconds=args.max_seconds,
                                   size=args.size, verify=True)
                loaded, done, cpu = await loaded_phase(client, png, concurrency=args.k, edits=args.edits,
                                                       max_seconds=args.max_seconds, size=args.size,
                                                       diagnose=args.diagnose)
    print(f"  loaded: {done} edits in {loaded.seconds:.1f} s, process CPU {cpu:.1f} s "
          f"({cpu / loaded.seconds:.2f} cores busy on average)")
    baseline = await idle_phase(min(loaded.seconds, args.max_seconds))
    print(f"  baseline: {baseline.seconds:.1f} s idle")
    control = await control_phase(image)
    print(f"  control: {control.note}")
    return [baseline, loaded, control]


# ------------------------------------------------------------------------------------------------
# Part 2


@dataclass
class EncodeRow:
    name: str
    configured: str
    default: str
    times_cfg: list[float] = field(default_factory=list)
    times_def: list[float] = field(default_factory=list)
    size_cfg: int = 0
    size_def: int = 0


def _save(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def part2(repeats: int, size: int) -> list[EncodeRow]:
    image = photo_like(size, size, seed=11)
    cases: list[tuple[EncodeRow, Any, Any]] = [
        (EncodeRow("PNG", "compress_level=1", "Pillow default (compress_level=6)"),
         lambda: encode_image(image, "png", None), lambda: _save(image, "PNG")),
        (EncodeRow("AVIF", "quality=80, speed=8", "Pillow default (quality=75, speed=6)"),
         lambda: encode_image(image, "avif", None), lambda: _save(image, "AVIF")),
        (EncodeRow("AVIF q80", "quality=80, speed=8", "quality=80, speed=6 (same quality)"),
         lambda: encode_image(image, "avif", None), lambda: _save(image, "AVIF", quality=80)),
    ]
    for row, configured, default in cases:
        configured(), default()  # warm-up
        for _ in range(repeats):  # interleaved, so drift hits both sides alike
            t0 = time.perf_counter()
            data_cfg = configured()
            t1 = time.perf_counter()
            data_def = default()
            t2 = time.perf_counter()
            row.times_cfg.append(t1 - t0)
            row.times_def.append(t2 - t1)
        row.size_cfg, row.size_def = len(data_cfg), len(data_def)
    return [row for row, _, _ in cases]


# ------------------------------------------------------------------------------------------------


def report(lags: list[Lag], rows: list[EncodeRow], args: argparse.Namespace) -> None:
    baseline, loaded, control = lags
    print()
    print(f"event_loop: {machine_line()}")
    print(f"part 1: {TICK * 1000:.0f} ms ticker; K={args.k} concurrent sandbox edits of a {args.size}x{args.size} "
          f"PNG -> AVIF (x = ratio to baseline)")
    print(f"{'phase':9s} {'ticks':>6s} {'max lag':>10s} {'p99 lag':>10s} {'mean lag':>10s}  "
          f"{'max x':>7s} {'p99 x':>7s}  note")
    for lag in lags:
        print(f"{lag.name:9s} {len(lag.lags):6d} {fmt_ms(lag.max):>10s} {fmt_ms(lag.p(99)):>10s} "
              f"{fmt_ms(statistics.fmean(lag.lags)):>10s}  {ratio(lag.max, baseline.max):7.1f} "
              f"{ratio(lag.p(99), baseline.p(99)):7.1f}  {lag.note}")
    print(f"loaded max lag / control max lag = {ratio(loaded.max, control.max):.2f}")
    print()
    print(f"part 2: encode_image vs Pillow defaults, {args.encode_size}x{args.encode_size}, "
          f"median of {args.encode_repeats} (x = configured/default)")
    print(f"{'format':9s} {'configured':>11s} {'default':>10s} {'time x':>7s}  {'size x':>7s}  settings")
    for row in rows:
        cfg, dfl = statistics.median(row.times_cfg), statistics.median(row.times_def)
        print(f"{row.name:9s} {fmt_ms(cfg):>11s} {fmt_ms(dfl):>10s} {ratio(cfg, dfl):7.2f}  "
              f"{ratio(row.size_cfg, row.size_def):7.2f}  {row.configured} vs {row.default}; "
              f"{row.size_cfg / 1024:.0f} vs {row.size_def / 1024:.0f} KiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", type=int, default=4, help="concurrent edits (default 4)")
    parser.add_argument("--edits", type=int, default=12, help="edits in the loaded phase (default 12)")
    parser.add_argument("--size", type=int, default=2048, help="input edge in px (default 2048)")
    parser.add_argument("--max-seconds", type=float, default=25.0, help="time limit of the loaded phase")
    parser.add_argument("--encode-size", type=int, default=1024, help="part 2 image edge (default 1024)")
    parser.add_argument("--encode-repeats", type=int, default=5, help="part 2 repeats (default 5)")
    parser.add_argument("--image-workers", type=int, default=None,
                        help="the gateway's image pool size (default: its own, the CPU count)")
    parser.add_argument("--skip-encoders", action="store_true", help="part 1 only")
    parser.add_argument("--diagnose", action="store_true",
                        help="sample the loop thread's stack and attribute late wake-ups (> 5 ms) to code")
    args = parser.parse_args(argv)

    image = photo_like(args.size, args.size)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    png = buf.getvalue()
    print(f"input: {args.size}x{args.size} PNG, {len(png) / 1e6:.1f} MB")

    lags = asyncio.run(part1(args, image, png))
    rows = [] if args.skip_encoders else part2(args.encode_repeats, args.encode_size)
    report(lags, rows, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
