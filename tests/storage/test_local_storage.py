"""storage.local.LocalStorage: ids, expiry, path safety, sweeping, I/O off the event loop."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from pathlib import Path

import pytest

from imagegate.settings import StorageSettings
from imagegate.storage import local
from imagegate.storage.local import LocalStorage

ID = re.compile(r"^[A-Za-z0-9_-]{32}\.png$")


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def storage(tmp_path: Path, clock: Clock) -> LocalStorage:
    return LocalStorage(tmp_path / "images", clock=clock)


async def test_put_then_get(storage: LocalStorage, clock: Clock) -> None:
    image_id = await storage.put(b"PNGDATA", content_type="image/png", extension="png", ttl_seconds=60)
    assert ID.match(image_id)
    stored = await storage.get(image_id)
    assert stored is not None
    assert (stored.data, stored.content_type, stored.expires_at) == (b"PNGDATA", "image/png", clock.now + 60)
    assert sorted(p.name for p in storage.root.iterdir()) == [image_id, image_id + ".json"]


async def test_ids_are_unique_and_unguessable(storage: LocalStorage) -> None:
    ids = {await storage.put(b"x", content_type="image/png", extension="png", ttl_seconds=60) for _ in range(50)}
    assert len(ids) == 50


async def test_accepts_storage_settings(tmp_path: Path) -> None:
    storage = LocalStorage(StorageSettings(path=tmp_path / "deep" / "dir"))
    assert storage.root == tmp_path / "deep" / "dir" and storage.root.is_dir()


async def test_expired_images_are_gone_and_deleted(storage: LocalStorage, clock: Clock) -> None:
    image_id = await storage.put(b"x", content_type="image/png", extension="png", ttl_seconds=10)
    clock.now += 9.9
    assert await storage.get(image_id) is not None
    clock.now += 0.1
    assert await storage.get(image_id) is None
    assert list(storage.root.iterdir()) == []


@pytest.mark.parametrize(
    "bad_id",
    [
        "../secret.png",
        "..",
        "/etc/passwd",
        "a/b.png",
        "",
        "x.png",
        "A" * 32,
        "A" * 32 + ".png.json",
        "A" * 32 + ".PNG",
        "A" * 32 + "./png",
        "A" * 31 + "\0.png",
        "A" * 32 + ".png\n",
    ],
)
async def test_malformed_ids_are_none_without_touching_the_disk(
    storage: LocalStorage, bad_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("the disk must not be read for a malformed id")

    monkeypatch.setattr(storage, "_read", fail)
    assert await storage.get(bad_id) is None


async def test_a_secret_outside_root_is_unreachable(tmp_path: Path, storage: LocalStorage) -> None:
    (tmp_path / "secret.png").write_bytes(b"secret")
    (tmp_path / "secret.png.json").write_text('{"content_type": "image/png", "expires_at": 1e12}')
    assert await storage.get("../secret.png") is None


async def test_unknown_and_metadata_less_ids_are_none(storage: LocalStorage) -> None:
    assert await storage.get("B" * 32 + ".png") is None
    (storage.root / ("C" * 32 + ".png")).write_bytes(b"orphan")
    assert await storage.get("C" * 32 + ".png") is None
    (storage.root / ("D" * 32 + ".png")).write_bytes(b"x")
    (storage.root / ("D" * 32 + ".png.json")).write_text("not json")
    assert await storage.get("D" * 32 + ".png") is None


@pytest.mark.parametrize("extension", ["../png", "png/", "", "p.ng", "x" * 9])
async def test_bad_extensions_are_refused(storage: LocalStorage, extension: str) -> None:
    with pytest.raises(ValueError):
        await storage.put(b"x", content_type="image/png", extension=extension, ttl_seconds=60)


async def test_extension_is_normalized(storage: LocalStorage) -> None:
    assert (await storage.put(b"x", content_type="image/png", extension=".PNG", ttl_seconds=60)).endswith(".png")


async def test_non_positive_ttl_is_refused(storage: LocalStorage) -> None:
    with pytest.raises(ValueError):
        await storage.put(b"x", content_type="image/png", extension="png", ttl_seconds=0)


async def test_sweep_deletes_only_expired_images_and_old_debris(storage: LocalStorage, clock: Clock) -> None:
    old = await storage.put(b"old", content_type="image/png", extension="png", ttl_seconds=10)
    fresh = await storage.put(b"new", content_type="image/png", extension="png", ttl_seconds=1000)
    orphan = storage.root / ("E" * 32 + ".png")
    orphan.write_bytes(b"crash debris")
    stale_tmp = storage.root / "x.png.abcd.tmp"
    stale_tmp.write_bytes(b"half written")
    recent_orphan = storage.root / ("F" * 32 + ".png")
    recent_orphan.write_bytes(b"being written right now")
    past = time.time() - 2 * 3600
    os.utime(orphan, (past, past))
    os.utime(stale_tmp, (past, past))
    clock.now += 11
    assert await storage.sweep() == 1
    names = {p.name for p in storage.root.iterdir()}
    assert names == {fresh, fresh + ".json", recent_orphan.name}
    assert old not in names


async def test_put_starts_a_background_sweep_once_per_interval(tmp_path: Path, clock: Clock) -> None:
    storage = LocalStorage(tmp_path, clock=clock, sweep_interval_seconds=100)
    expired = await storage.put(b"x", content_type="image/png", extension="png", ttl_seconds=5)
    clock.now += 50
    await storage.put(b"y", content_type="image/png", extension="png", ttl_seconds=500)
    await asyncio.sleep(0.05)
    assert (tmp_path / expired).exists()  # interval not reached: no sweep yet
    clock.now += 60
    await storage.put(b"z", content_type="image/png", extension="png", ttl_seconds=500)
    for _ in range(100):
        if not (tmp_path / expired).exists():
            break
        await asyncio.sleep(0.01)
    assert not (tmp_path / expired).exists()
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".json"]) == 2
    await storage.close()


async def test_file_io_runs_off_the_event_loop(storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []
    original = local._atomic_write

    def spy(path: Path, data: bytes) -> None:
        threads.append(threading.get_ident())
        original(path, data)

    monkeypatch.setattr(local, "_atomic_write", spy)
    image_id = await storage.put(b"x", content_type="image/png", extension="png", ttl_seconds=60)
    assert threads and all(t != loop_thread for t in threads)

    read_threads: list[int] = []
    original_read = storage._read

    def read_spy(image_id: str) -> object:
        read_threads.append(threading.get_ident())
        return original_read(image_id)

    monkeypatch.setattr(storage, "_read", read_spy)
    assert await storage.get(image_id) is not None
    assert read_threads and read_threads[0] != loop_thread


async def test_ready(storage: LocalStorage) -> None:
    assert await storage.ready() is True
    assert list(storage.root.iterdir()) == []  # the probe file is removed
    storage.root.rmdir()
    storage.root.write_bytes(b"not a directory")
    assert await storage.ready() is False


async def test_a_write_the_disk_refuses_is_storage_unavailable(tmp_path: Path) -> None:
    """A full disk or a vanished directory is a clean 503 `storage_unavailable`, not a 500."""
    from imagegate.storage.base import StorageUnavailable

    root = tmp_path / "images"
    storage = LocalStorage(root)
    root.rmdir()
    root.write_bytes(b"not a directory")
    with pytest.raises(StorageUnavailable) as raised:
        await storage.put(b"x", content_type="image/png", extension="png", ttl_seconds=60)
    assert raised.value.status == 503 and raised.value.code == "storage_unavailable"
