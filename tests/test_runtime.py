"""The collector tuning the app applies when it starts serving (`imagegate.runtime`): what startup
allocated is frozen out of the collector, and the thresholds are the gateway's, once per process."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import gateway_settings

from imagegate import runtime
from imagegate.app import create_app


@pytest.fixture
def untuned(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process whose collector was not tuned yet; put back as it was afterwards."""
    threshold = gc.get_threshold()
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    monkeypatch.setattr(runtime, "_tuned", False)
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_gc_freezes_startup_and_sets_the_thresholds(untuned: None) -> None:
    assert gc.get_freeze_count() == 0
    runtime.tune_gc()
    frozen = gc.get_freeze_count()
    assert frozen > 0 and gc.get_threshold() == runtime.GC_THRESHOLD
    gc.set_threshold(700, 10, 10)
    runtime.tune_gc()  # once per process: a second app in the same process changes nothing
    assert gc.get_freeze_count() == frozen and gc.get_threshold() == (700, 10, 10)


def test_thresholds_keep_young_collections_short_and_full_ones_rare() -> None:
    young, middle, old = runtime.GC_THRESHOLD
    # a middle-generation collection scans about young * middle objects, at 0.5-1 us each with
    # thousands of jobs in flight (runtime.py): tens of milliseconds at most, not hundreds
    assert young * middle <= 50_000
    assert old >= 100  # no full collection (hundreds of ms) while a burst's jobs fill the heap


async def test_the_app_tunes_the_collector_when_it_starts_serving(tmp_path: Path, untuned: None) -> None:
    app = create_app(gateway_settings(tmp_path))
    assert gc.get_freeze_count() == 0
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 0 and gc.get_threshold() == runtime.GC_THRESHOLD
