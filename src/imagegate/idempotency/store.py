"""Where idempotency records live: `MemoryStore` (one process) or `RedisStore` (every instance).

A record is `pending` while its first request runs (held by an owner token under a lease that the
owner renews; a crashed owner's lease runs out) and `done` with the response skeleton once it
succeeded (kept for `idempotency.ttl_seconds`). Claiming is atomic: `SET NX` in Redis, a dict
insert without an `await` in memory. Renewing, completing and releasing check the owner token
(a Lua compare-and-set in Redis), so a late owner never removes a newer claim.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from redis.asyncio import Redis

from imagegate.state.redis import unavailable_as_503

__all__ = ["IdempotencyStore", "MemoryStore", "Record", "RedisStore"]


@dataclass(frozen=True, slots=True)
class Record:
    state: Literal["pending", "done"]
    fingerprint: str
    owner: str
    response: dict[str, Any] | None = None

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> Record:
        data = json.loads(raw)
        return cls(data["state"], data["fingerprint"], data["owner"], data.get("response"))


class IdempotencyStore(abc.ABC):
    @abc.abstractmethod
    async def claim(self, key: str, record: Record, lease_seconds: float) -> Record | None:
        """Store the pending `record` unless `key` holds one; return the existing record, or None (claimed)."""

    @abc.abstractmethod
    async def renew(self, key: str, owner: str, lease_seconds: float) -> None: ...

    @abc.abstractmethod
    async def complete(self, key: str, record: Record, ttl_seconds: float) -> None:
        """Replace the owner's pending record with the `done` one (or store it where the key lapsed
        unclaimed); never a record another owner claimed after this one's lease ran out."""

    @abc.abstractmethod
    async def release(self, key: str, owner: str) -> None:
        """Delete the owner's pending record (its request failed)."""


class MemoryStore(IdempotencyStore):
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_records: int = 100_000) -> None:
        self._clock = clock
        self._max = max_records
        self._records: dict[str, tuple[Record, float]] = {}
        self._claims = 0

    def _live(self, key: str) -> Record | None:
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._records[key]
            return None
        return entry[0]

    def _sweep(self) -> None:
        now = self._clock()
        for key in [k for k, (_, expires) in self._records.items() if expires <= now]:
            del self._records[key]
        room = self._max - max(1, self._max // 10)  # a tenth at once: the next sweep is many claims away
        while len(self._records) > room:  # oldest inserted first
            del self._records[next(iter(self._records))]

    async def claim(self, key: str, record: Record, lease_seconds: float) -> Record | None:
        existing = self._live(key)
        if existing is not None:
            return existing
        self._claims += 1
        if len(self._records) >= self._max or self._claims % 1024 == 0:
            self._sweep()
        self._records[key] = (record, self._clock() + lease_seconds)
        return None

    async def renew(self, key: str, owner: str, lease_seconds: float) -> None:
        current = self._live(key)
        if current is not None and current.state == "pending" and current.owner == owner:
            self._records[key] = (current, self._clock() + lease_seconds)

    async def complete(self, key: str, record: Record, ttl_seconds: float) -> None:
        current = self._live(key)
        if current is None or (current.state == "pending" and current.owner == record.owner):
            self._records[key] = (record, self._clock() + ttl_seconds)

    async def release(self, key: str, owner: str) -> None:
        current = self._live(key)
        if current is not None and current.state == "pending" and current.owner == owner:
            del self._records[key]

    def size_of(self, key: str) -> int:
        current = self._live(key)
        return len(current.dumps()) if current else 0


_RENEW = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v).owner == ARGV[1] and cjson.decode(v).state == 'pending' then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_COMPLETE = """
local v = redis.call('GET', KEYS[1])
if v then
  local r = cjson.decode(v)
  if r.owner ~= ARGV[1] or r.state ~= 'pending' then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v).owner == ARGV[1] and cjson.decode(v).state == 'pending' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStore(IdempotencyStore):
    def __init__(self, redis: Redis, *, prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{prefix}idempotency:"
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._complete = redis.register_script(_COMPLETE)

    def key(self, key: str) -> str:
        return self._prefix + key

    async def claim(self, key: str, record: Record, lease_seconds: float) -> Record | None:
        with unavailable_as_503("claiming an Idempotency-Key"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(self.key(key), record.dumps(), nx=True, px=round(lease_seconds * 1000))
            pipe.get(self.key(key))
            claimed, current = await pipe.execute()
        if claimed or current is None:
            return None if claimed else await self.claim(key, record, lease_seconds)
        return Record.loads(current)

    async def renew(self, key: str, owner: str, lease_seconds: float) -> None:
        with unavailable_as_503("renewing an Idempotency-Key"):
            await self._renew(keys=[self.key(key)], args=[owner, round(lease_seconds * 1000)])

    async def complete(self, key: str, record: Record, ttl_seconds: float) -> None:
        with unavailable_as_503("storing an idempotent response"):
            await self._complete(
                keys=[self.key(key)], args=[record.owner, record.dumps(), round(ttl_seconds * 1000)]
            )

    async def release(self, key: str, owner: str) -> None:
        with unavailable_as_503("releasing an Idempotency-Key"):
            await self._release(keys=[self.key(key)], args=[owner])

    async def size_of(self, key: str) -> int:
        size: int = await self._redis.strlen(self.key(key))
        return size
