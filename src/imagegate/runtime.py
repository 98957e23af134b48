"""Process-wide runtime tuning applied when the app starts serving.

Garbage collection: with thousands of requests in flight the heap holds hundreds of thousands of
live objects, and CPython's full collections walk all of them; in a 2,000-job burst the collector
took about half of the process's CPU (bench/README.md, "In flight"). Everything allocated before
serving (modules, the app, the catalog, the tables) lives as long as the process, so it is frozen
out of the collector once.

The thresholds keep every pause short and full collections rare. Each object that outlives a
job's first moments is scanned once by a young and once by a middle collection whatever the
thresholds (the collector's work grows with the jobs in flight, not with the thresholds); what
the thresholds decide is how long one pause lasts. With 10,000 jobs in flight a middle
collection scans ~0.5-1 us per object: at (10,000, 10, 10) those pauses took 100-350 ms and a full
collection 400-670 ms, each a stalled event loop and a late `/healthz`. At (3,000, 5, 300) a young
collection sees ~3,000 new objects and a middle one ~15,000, and a full collection waits for 300
middle ones (on top of CPython's rule that the long-lived objects grew by a quarter): none ran
during a 10,000-job burst, and the collector's CPU fell from ~3 s to ~2 s
(`bench/inflight_burst.py --gc-stats`).
"""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLD", "tune_gc"]

GC_THRESHOLD = (3_000, 5, 300)
_tuned = False


def tune_gc() -> None:
    """Freeze what startup allocated and set GC_THRESHOLD (once per process)."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
