"""The storage interface behind `response_format=url` (rehost mode)."""

from __future__ import annotations

import abc
from dataclasses import dataclass

__all__ = ["Storage", "StoredImage"]


@dataclass(frozen=True, slots=True)
class StoredImage:
    data: bytes
    content_type: str
    expires_at: float  # unix seconds


class Storage(abc.ABC):
    """Stores output images under unguessable ids and serves them until they expire."""

    @abc.abstractmethod
    async def put(self, data: bytes, *, content_type: str, extension: str, ttl_seconds: int) -> str:
        """Store `data`; return its id (unguessable, URL-safe, ending in `.{extension}`)."""

    @abc.abstractmethod
    async def get(self, image_id: str) -> StoredImage | None:
        """The stored image, or None if it does not exist, has expired, or the id is malformed."""

    async def ready(self) -> bool:
        """Whether the storage can take new images (`/readyz`). An exception also means not ready.

        The default is a round trip: store a one-byte object with a short TTL and read it back.
        Storages with a cheaper check (LocalStorage: a temporary file) override it."""
        image_id = await self.put(b"\0", content_type="application/octet-stream", extension="bin", ttl_seconds=60)
        return await self.get(image_id) is not None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
