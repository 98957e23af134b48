"""Loaded by the gateway process of `inflight_burst.py --gc-stats` (this directory on its
PYTHONPATH): records every garbage collection (generation, wall and CPU pause, objects collected)
and rewrites the list to the file named by BENCH_GC_STATS once a second, so the bench reads the
collector's share of a burst."""

from __future__ import annotations

import gc
import json
import os
import threading
import time

_path = os.environ.get("BENCH_GC_STATS")
if _path:
    _pauses: list[tuple[int, float, float, int]] = []  # generation, wall, CPU, collected
    _started = [0.0, 0.0]

    def _on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _started[:] = time.perf_counter(), time.thread_time()
        else:
            _pauses.append((
                info["generation"], time.perf_counter() - _started[0], time.thread_time() - _started[1],
                info["collected"],
            ))

    _threshold = os.environ.get("BENCH_GC_THRESHOLD")  # "a,b,c": an experiment's thresholds, set over the app's

    def _dump() -> None:
        while True:
            time.sleep(1.0)
            if _threshold:
                gc.set_threshold(*(int(part) for part in _threshold.split(",")))
            snapshot = list(_pauses)
            with open(_path + ".tmp", "w") as out:
                json.dump({"pauses": snapshot, "threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}, out)
            os.replace(_path + ".tmp", _path)

    gc.callbacks.append(_on_gc)
    threading.Thread(target=_dump, daemon=True).start()
