"""The storage interface behind `response_format=url` (rehost mode)."""

from __future__ import annotations

import abc
import re
import secrets
from dataclasses import dataclass

from imagegate.core.errors import GatewayError

__all__ = ["IMAGE_ID", "Storage", "StorageUnavailable", "StoredImage", "new_image_id"]

IMAGE_ID = re.compile(r"\A[A-Za-z0-9_-]{32}\.[a-z0-9]{1,8}\Z")  # what every backend accepts as an id
_EXTENSION = re.compile(r"\A[a-z0-9]{1,8}\Z")


def new_image_id(extension: str, ttl_seconds: int) -> str:
    """A fresh unguessable id (`secrets.token_urlsafe(24)` + `.<extension>`), after checking the
    arguments of `Storage.put` (ValueError for a bad extension or a non-positive TTL)."""
    ext = extension.lower().lstrip(".")
    if not _EXTENSION.match(ext):
        raise ValueError(f"invalid file extension {extension!r}")
    if ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
    return f"{secrets.token_urlsafe(24)}.{ext}"


class StorageUnavailable(GatewayError):
    """503: the image storage (e.g. the S3 server) did not answer. Raised by backends in place of
    their client's own errors, so an outage is a clean envelope, never a 500 with a traceback."""

    status = 503
    type = "server_error"
    code = "storage_unavailable"

    def __init__(self) -> None:
        super().__init__("The gateway's image storage is unavailable; please retry shortly.", retry_after=1.0)


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

    async def url_for(self, image_id: str, *, ttl_seconds: int) -> str | None:
        """A URL the client downloads `image_id` from directly (e.g. a presigned S3 URL valid for
        `ttl_seconds`), or None: the gateway serves it at `/v1/files/images/{image_id}`."""
        return None

    async def ready(self) -> bool:
        """Whether the storage can take new images (`/readyz`). An exception also means not ready.

        The default is a round trip: store a one-byte object with a short TTL and read it back.
        Storages with a cheaper check (LocalStorage: a temporary file) override it."""
        image_id = await self.put(b"\0", content_type="application/octet-stream", extension="bin", ttl_seconds=60)
        return await self.get(image_id) is not None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
