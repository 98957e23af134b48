"""Process-wide runtime tuning applied when the app starts serving.

Garbage collection: with thousands of requests in flight the heap holds hundreds of thousands of
live objects, and CPython's full collections walk all of them; in a 2,000-job burst the collector
took about half of the process's CPU (bench/README.md, "In flight"). Everything allocated before
serving (modules, the app, the catalog, the tables) lives as long as the process, so it is frozen
out of the collector once, and the youngest generation is collected every 10,000 net allocations
instead of 700 (full collections still run, on CPython's usual ratios).
"""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLD", "tune_gc"]

GC_THRESHOLD = (10_000, 10, 10)
_tuned = False


def tune_gc() -> None:
    """Freeze what startup allocated and raise the young-generation threshold (once per process)."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
