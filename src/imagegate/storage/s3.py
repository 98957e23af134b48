"""Output images in an S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, ...), through obstore.

Object key: `<prefix><id>`, with the same ids as LocalStorage (`secrets.token_urlsafe(24)` +
`.<extension>`, validated strictly before any key is built). Each object carries its
`Content-Type` and the user metadata `x-amz-meta-imagegate-expires-at` (unix seconds).

URL styles (`storage.s3.url_style`):
- `presigned`: the response's URL is a SigV4 presigned GET URL valid for `ttl_seconds`; the
  client downloads from the bucket, and the URL's own lifetime is the expiry. Signing is local
  (no request); `public_endpoint_url` signs for the host clients reach (e.g. MinIO behind a proxy).
- `gateway`: the URL is the gateway's `/v1/files/images/{id}`; `get` enforces the expiry from the
  object's metadata (an expired object is a 404, and is deleted best-effort).

Deletion is the bucket's job: an operator adds a lifecycle rule expiring `<prefix>` objects after
ceil(ttl_seconds / 86400) + 1 days (README, "S3 storage").

`ready()` writes one fixed probe object (`<prefix>.imagegate-ready`): it proves the bucket exists
and the credentials may write, and leaves no debris; at most one probe runs at a time, and a
success stands for a second. Every call is bounded by `timeout_seconds`.

Why obstore: no Python dependencies (a Rust core, Apache Arrow's `object_store`), presigning
built in, and measured faster than aiobotocore against the same local S3 server (README).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import obstore
from obstore.store import S3Store

from imagegate.settings import S3StorageSettings, StorageSettings
from imagegate.storage.base import IMAGE_ID, Storage, StorageUnavailable, StoredImage, new_image_id

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

__all__ = ["S3Storage"]

logger = logging.getLogger(__name__)

EXPIRES_META = "imagegate-expires-at"
READY_PROBE = ".imagegate-ready"
_MAX_PRESIGNED_SECONDS = 604_800  # SigV4: 7 days


class S3Storage(Storage):
    def __init__(
        self,
        settings: StorageSettings | S3StorageSettings,
        *,
        clock: Callable[[], float] = time.time,
        ready_cache_seconds: float = 1.0,
    ) -> None:
        s3 = settings.s3 if isinstance(settings, StorageSettings) else settings
        if not s3.bucket:
            raise ValueError("storage.s3.bucket is required for the s3 backend")
        self.settings = s3
        self.prefix = s3.prefix.lstrip("/")
        self._clock = clock
        self._timeout = s3.timeout_seconds
        self._store = _store(s3, s3.endpoint_url)
        public = s3.public_endpoint_url
        self._signer = self._store if not public or public == s3.endpoint_url else _store(s3, public)
        self._ready_cache = ready_cache_seconds
        self._ready_until = 0.0  # time.monotonic() until which the last successful probe stands
        self._ready_lock = asyncio.Lock()

    def _key(self, image_id: str) -> str:
        return f"{self.prefix}{image_id}"

    async def put(self, data: bytes, *, content_type: str, extension: str, ttl_seconds: int) -> str:
        image_id = new_image_id(extension, ttl_seconds)
        attributes: Any = {"Content-Type": content_type, EXPIRES_META: f"{self._clock() + ttl_seconds:.3f}"}
        async with _unavailable_as_503("put"), asyncio.timeout(self._timeout):
            await obstore.put_async(self._store, self._key(image_id), data, attributes=attributes)
        return image_id

    async def get(self, image_id: str) -> StoredImage | None:
        if not IMAGE_ID.match(image_id):
            return None
        key = self._key(image_id)
        async with _unavailable_as_503("get"), asyncio.timeout(self._timeout):
            try:
                result = await obstore.get_async(self._store, key)
            except FileNotFoundError:
                return None
            attributes = result.attributes
            expires_at = _expires_at(attributes.get(EXPIRES_META))
            if expires_at is None or expires_at <= self._clock():
                await self._delete(key)
                return None
            data = bytes(await result.bytes_async())
        content_type = attributes.get("Content-Type") or "application/octet-stream"
        return StoredImage(data=data, content_type=str(content_type), expires_at=expires_at)

    async def url_for(self, image_id: str, *, ttl_seconds: int) -> str | None:
        if self.settings.url_style != "presigned":
            return None
        lifetime = timedelta(seconds=max(1, min(ttl_seconds, _MAX_PRESIGNED_SECONDS)))
        return await obstore.sign_async(self._signer, "GET", self._key(image_id), lifetime)

    async def ready(self) -> bool:
        """Write the fixed probe object: the bucket exists, is reachable, and takes writes. `/readyz`
        is open, so probes run one at a time and a success stands for `ready_cache_seconds`: no
        caller can turn readiness checks into a stream of paid S3 writes."""
        async with self._ready_lock:
            if time.monotonic() < self._ready_until:
                return True
            async with asyncio.timeout(min(self._timeout, 5.0)):
                await obstore.put_async(self._store, f"{self.prefix}{READY_PROBE}", b"")
            self._ready_until = time.monotonic() + self._ready_cache
        return True

    async def _delete(self, key: str) -> None:
        with contextlib.suppress(Exception):
            await obstore.delete_async(self._store, key)


@contextlib.asynccontextmanager
async def _unavailable_as_503(operation: str) -> AsyncIterator[None]:
    """An S3 failure (unreachable, timed out, refused) is a 503 `storage_unavailable`, never a 500;
    the client sees no detail of it, the log sees its type."""
    try:
        yield
    except Exception as exc:  # TimeoutError included
        logger.warning("S3 %s failed: %s", operation, type(exc).__name__)
        raise StorageUnavailable() from exc


def _store(s3: S3StorageSettings, endpoint: str | None) -> S3Store:
    """An S3Store for `endpoint` (None: AWS). Credentials not given here come from the environment
    (`AWS_ACCESS_KEY_ID`, ...) or the instance profile, as obstore resolves them."""
    config: dict[str, Any] = {"region": s3.region}
    if endpoint:
        config["endpoint"] = endpoint
    if s3.access_key_id:
        config["access_key_id"] = s3.access_key_id
    if s3.secret_access_key is not None:
        config["secret_access_key"] = s3.secret_access_key.get_secret_value()
    timeout = timedelta(seconds=s3.timeout_seconds)
    client: ClientConfig = {
        "allow_http": bool(endpoint and endpoint.startswith("http://")),
        "timeout": timeout,
        "connect_timeout": timedelta(seconds=min(5.0, s3.timeout_seconds)),
    }
    retry: RetryConfig = {"max_retries": 2, "retry_timeout": timeout}
    try:
        return S3Store(s3.bucket, config=config, client_options=client, retry_config=retry)  # type: ignore[arg-type]
    except Exception as exc:  # e.g. a secret without its key id: the app fails when built, not at a request
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"storage.s3 is not usable: {reason}") from None


def _expires_at(value: object) -> float | None:
    try:
        return float(str(value)) if value is not None else None
    except ValueError:
        return None
