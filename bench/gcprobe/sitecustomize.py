"""Loaded by the gateway process of `inflight_burst.py --gc-stats` (this directory on its
PYTHONPATH): records every garbage collection (generation, wall and CPU pause, objects collected,
when) and the event loop's lag (a 5 ms heartbeat timer, started when the app freezes its startup
heap from inside the loop), and rewrites both lists to the file named by BENCH_GC_STATS once a
second, so the bench reads the collector's share of a burst and what kept the loop busy."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time

_path = os.environ.get("BENCH_GC_STATS")
if _path:
    _pauses: list[tuple[int, float, float, int, float]] = []  # generation, wall, CPU, collected, started
    _lags: list[tuple[float, float]] = []  # (when, seconds late) for heartbeats more than 20 ms late
    _started = [0.0, 0.0]

    _sizes = os.environ.get("BENCH_GC_SIZES")  # diagnosis: the size of the collected generations, not timed
    _young: list[int] = [0]

    def _on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            if _sizes:
                _young[0] = sum(len(gc.get_objects(g)) for g in range(info["generation"] + 1))
            _started[:] = time.perf_counter(), time.thread_time()
        else:
            _pauses.append((
                info["generation"], time.perf_counter() - _started[0], time.thread_time() - _started[1],
                _young[0] if _sizes else info["collected"], _started[0],
            ))

    _freeze = gc.freeze

    def _freeze_and_watch() -> None:
        """`gc.freeze` as `runtime.tune_gc` calls it, on the loop: the heartbeat starts there."""
        _freeze()
        loop = asyncio.get_running_loop()

        def beat(due: float) -> None:
            now = time.perf_counter()
            if now - due > 0.02:
                _lags.append((due, now - due))
            loop.call_later(0.005, beat, now + 0.005)

        loop.call_later(0.005, beat, time.perf_counter() + 0.005)

    gc.freeze = _freeze_and_watch
    _threshold = os.environ.get("BENCH_GC_THRESHOLD")  # "a,b,c": an experiment's thresholds, set over the app's

    def _dump() -> None:
        while True:
            time.sleep(1.0)
            if _threshold:
                gc.set_threshold(*(int(part) for part in _threshold.split(",")))
            snapshot = list(_pauses)
            with open(_path + ".tmp", "w") as out:
                json.dump({"pauses": snapshot, "lags": list(_lags), "threshold": gc.get_threshold()}, out)
            os.replace(_path + ".tmp", _path)

    gc.callbacks.append(_on_gc)
    threading.Thread(target=_dump, daemon=True).start()
