"""`Idempotency`: run a request at most once per (client key, Idempotency-Key)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from imagegate.core.errors import GatewayError, InvalidRequest
from imagegate.core.request import ImageRequest
from imagegate.core.results import ImageResult
from imagegate.idempotency.codec import fingerprint, restore, skeleton
from imagegate.idempotency.store import IdempotencyStore, Record
from imagegate.storage.base import Storage

__all__ = ["IDEMPOTENCY_HEADER", "REPLAYED_HEADER", "Idempotency", "IdempotencyKeyReused", "check_key"]

log = logging.getLogger("imagegate.idempotency")
IDEMPOTENCY_HEADER = "idempotency-key"
REPLAYED_HEADER = "idempotent-replayed"
_MAX_KEY_CHARS = 255


class IdempotencyKeyReused(GatewayError):
    """409. A reused key is final (`x-should-retry: false`: the SDKs retry 409 otherwise); a key
    still in use (`idempotency_key_in_use`) may be retried."""

    status = 409
    type = "invalid_request_error"
    code = "idempotency_key_reused"

    @property
    def extra_headers(self) -> dict[str, str]:
        return {"x-should-retry": "false"} if self.code == "idempotency_key_reused" else {}


def check_key(value: str) -> str:
    """A sane Idempotency-Key header value: 1-255 printable ASCII characters."""
    key = value.strip()
    if not key or len(key) > _MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise InvalidRequest(
            f"The Idempotency-Key header must be 1 to {_MAX_KEY_CHARS} printable ASCII characters.",
            param="Idempotency-Key",
        )
    return key


class Idempotency:
    def __init__(
        self,
        store: IdempotencyStore,
        storage: Storage,
        *,
        ttl_seconds: int,
        lease_seconds: float,
        max_wait_seconds: float,
    ) -> None:
        self.store = store
        self.storage = storage
        self.ttl_seconds = ttl_seconds
        self.lease_seconds = lease_seconds
        self.max_wait_seconds = max_wait_seconds
        self._storing: set[asyncio.Future[None]] = set()  # completions that outlive a departed client

    @staticmethod
    def record_key(scope: str, key: str) -> str:
        return hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()

    async def run(
        self,
        scope: str,
        key: str,
        request: ImageRequest,
        work: Callable[[], Awaitable[ImageResult]],
        *,
        on_wait: Callable[[], Awaitable[None]] | None = None,
    ) -> ImageResult:
        """`work()`'s result, run at most once for (`scope`, `key`) while its record lives.
        `on_wait` runs once when this request starts waiting for a running first one."""
        record_key = self.record_key(scope, check_key(key))
        wanted = await asyncio.to_thread(fingerprint, request)  # hashes every input image: off the event loop
        give_up = time.monotonic() + self.max_wait_seconds
        delay = 0.02
        while True:
            mine = Record("pending", wanted, uuid.uuid4().hex)
            existing = await self.store.claim(record_key, mine, self.lease_seconds)
            if existing is None:
                return await self._run_owned(record_key, mine, work)
            if existing.fingerprint != wanted:
                raise IdempotencyKeyReused(
                    "This Idempotency-Key was already used with a different request.", param="Idempotency-Key"
                )
            if existing.state == "done" and existing.response is not None:
                result = await restore(existing.response, self.storage)
                result.headers[REPLAYED_HEADER] = "true"
                return result
            if time.monotonic() >= give_up:  # the first request is still running: the client may retry later
                raise IdempotencyKeyReused(
                    "A request with this Idempotency-Key is still in progress.",
                    param="Idempotency-Key",
                    code="idempotency_key_in_use",
                )
            if on_wait is not None:
                await on_wait()
                on_wait = None
            await asyncio.sleep(delay)  # a duplicate waits for the first, then replays its result
            delay = min(delay * 1.5, 0.25)

    async def _run_owned(
        self, record_key: str, mine: Record, work: Callable[[], Awaitable[ImageResult]]
    ) -> ImageResult:
        renewer = asyncio.create_task(self._keep_lease(record_key, mine.owner))
        try:
            result = await work()
        except BaseException:  # a failure stores nothing: the retry runs again (cancellation included)
            renewer.cancel()
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release(record_key, mine.owner))
            raise
        renewer.cancel()
        # The work is done and paid for: store it even if the client leaves meanwhile (its retry replays).
        storing = asyncio.ensure_future(self._complete(record_key, mine, result))
        self._storing.add(storing)
        storing.add_done_callback(self._storing.discard)
        await asyncio.shield(storing)
        return result

    async def _complete(self, record_key: str, mine: Record, result: ImageResult) -> None:
        try:
            response = await skeleton(result, self.storage, ttl_seconds=self.ttl_seconds + 60)
            done = Record("done", mine.fingerprint, mine.owner, response)
            await self.store.complete(record_key, done, self.ttl_seconds)
        except Exception:  # the work is done and paid for: answer anyway
            log.warning("could not store the response of an Idempotency-Key; a repeat will run again", exc_info=True)
            with contextlib.suppress(Exception):
                await self.store.release(record_key, mine.owner)

    async def _keep_lease(self, record_key: str, owner: str) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.store.renew(record_key, owner, self.lease_seconds)
            except Exception:
                log.warning("could not renew an Idempotency-Key's lease")
