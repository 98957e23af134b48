"""Output images on the local disk, served until they expire.

Layout under `root`: `<id>` holds the image bytes and `<id>.json` its metadata
(`{"content_type": ..., "expires_at": <unix seconds>}`); an id is `secrets.token_urlsafe(24)`
(32 URL-safe characters) plus `.<extension>`. Ids are validated strictly before any path is
built, so no request can name a file outside `root`. Files are written to a temporary name and
renamed into place (metadata last, so a half-written image is never served). All file I/O runs
in a worker thread. Expired images are deleted when read, and by a sweep that `put` starts in
the background at most once per `sweep_interval_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from imagegate.settings import StorageSettings
from imagegate.storage.base import IMAGE_ID, Storage, StorageUnavailable, StoredImage, new_image_id

__all__ = ["LocalStorage"]

logger = logging.getLogger(__name__)

_META = ".json"
_TMP = ".tmp"
_ORPHAN_GRACE_SECONDS = 3600.0  # an image without metadata older than this is debris from a crash


class LocalStorage(Storage):
    def __init__(
        self,
        root: str | Path | StorageSettings,
        *,
        sweep_interval_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root.path if isinstance(root, StorageSettings) else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep_interval = sweep_interval_seconds
        self._clock = clock
        self._last_sweep = clock()
        self._sweeper: asyncio.Task[int] | None = None

    async def put(self, data: bytes, *, content_type: str, extension: str, ttl_seconds: int) -> str:
        image_id = new_image_id(extension, ttl_seconds)
        meta = {"content_type": content_type, "expires_at": self._clock() + ttl_seconds}
        try:
            await asyncio.to_thread(self._write, image_id, data, json.dumps(meta).encode())
        except OSError as exc:  # a full disk, a vanished directory: a 503, not a 500
            logger.warning("could not store an image in %s: %s", self.root, exc)
            raise StorageUnavailable() from None
        self._maybe_sweep()
        return image_id

    async def get(self, image_id: str) -> StoredImage | None:
        if not IMAGE_ID.match(image_id):
            return None
        return await asyncio.to_thread(self._read, image_id)

    async def sweep(self) -> int:
        """Delete every expired image (and stale debris); return how many images were removed."""
        return await asyncio.to_thread(self._sweep)

    async def ready(self) -> bool:
        """Whether the storage directory is writable (a temporary file is created and removed)."""
        return await asyncio.to_thread(self._writable)

    async def close(self) -> None:
        if self._sweeper is not None and not self._sweeper.done():
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._sweeper = None

    # -- in a worker thread ---------------------------------------------------------------------

    def _write(self, image_id: str, data: bytes, meta: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / image_id
        _atomic_write(path, data)
        _atomic_write(path.with_name(image_id + _META), meta)

    def _read(self, image_id: str) -> StoredImage | None:
        path = self.root / image_id
        meta = _load_meta(path.with_name(image_id + _META))
        if meta is None:
            return None
        content_type, expires_at = meta
        if expires_at <= self._clock():
            _remove(path)
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None
        return StoredImage(data=data, content_type=content_type, expires_at=expires_at)

    def _sweep(self) -> int:
        now = self._clock()
        removed = 0
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return 0
        names = {entry.name for entry in entries}
        for entry in entries:
            name = entry.name
            if name.endswith(_META) and IMAGE_ID.match(name[: -len(_META)]):
                meta = _load_meta(Path(entry.path))
                if meta is None or meta[1] <= now:
                    _remove(self.root / name[: -len(_META)])
                    removed += 1
            elif (IMAGE_ID.match(name) and name + _META not in names) or name.endswith(_TMP):
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat().st_mtime > _ORPHAN_GRACE_SECONDS:  # file times are wall-clock
                        os.unlink(entry.path)
        return removed

    def _writable(self) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".ready-{secrets.token_hex(8)}{_TMP}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            return False
        return True

    # -- sweeping ------------------------------------------------------------------------------

    def _maybe_sweep(self) -> None:
        now = self._clock()
        if now - self._last_sweep < self._sweep_interval:
            return
        if self._sweeper is not None and not self._sweeper.done():
            return
        self._last_sweep = now
        self._sweeper = asyncio.get_running_loop().create_task(self.sweep(), name="imagegate-storage-sweep")
        self._sweeper.add_done_callback(_log_sweep_failure)


def _log_sweep_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.warning("storage sweep failed: %r", exc)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}{_TMP}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _load_meta(path: Path) -> tuple[str, float] | None:
    try:
        meta = json.loads(path.read_bytes())
        content_type, expires_at = meta["content_type"], meta["expires_at"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(content_type, str) or not isinstance(expires_at, int | float):
        return None
    return content_type, float(expires_at)


def _remove(path: Path) -> None:
    """Delete an image and its metadata (metadata first, so it is never served half-deleted)."""
    for target in (path.with_name(path.name + _META), path):
        with contextlib.suppress(FileNotFoundError, OSError):
            target.unlink()
