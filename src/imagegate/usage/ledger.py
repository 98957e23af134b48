"""Per-key counters: requests, images, pixels and cost (in micro-dollars, so sums stay exact).

`MemoryLedger` counts in one process; `RedisLedger` in one hash per key (`<prefix>usage:<name>`,
`HINCRBY` in a MULTI), with the key names in the set `<prefix>usage:keys`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis

from imagegate.state.redis import unavailable_as_503

__all__ = ["MemoryLedger", "RedisLedger", "UsageLedger", "UsageTotals"]

_FIELDS = ("requests", "images", "pixels", "cost_microusd")


@dataclass(slots=True)
class UsageTotals:
    requests: int = 0
    images: int = 0
    pixels: int = 0
    cost_microusd: int = 0

    def as_json(self, name: str) -> dict[str, object]:
        return {
            "object": "imagegate.usage",
            "key": name,
            "requests": self.requests,
            "images": self.images,
            "megapixels": round(self.pixels / 1e6, 6),
            "cost_usd": round(self.cost_microusd / 1e6, 6),
        }


class UsageLedger(abc.ABC):
    @abc.abstractmethod
    async def record(self, name: str, *, images: int, megapixels: float, cost_usd: float) -> None: ...

    @abc.abstractmethod
    async def totals(self, names: Iterable[str] | None = None) -> dict[str, UsageTotals]:
        """The totals of `names` (every key that has any, when None)."""

    @staticmethod
    def _increments(images: int, megapixels: float, cost_usd: float) -> dict[str, int]:
        return {
            "requests": 1,
            "images": images,
            "pixels": round(megapixels * 1e6),
            "cost_microusd": round(cost_usd * 1e6),
        }


class MemoryLedger(UsageLedger):
    def __init__(self) -> None:
        self._totals: dict[str, UsageTotals] = {}

    async def record(self, name: str, *, images: int, megapixels: float, cost_usd: float) -> None:
        totals = self._totals.setdefault(name, UsageTotals())
        for field, amount in self._increments(images, megapixels, cost_usd).items():
            setattr(totals, field, getattr(totals, field) + amount)

    async def totals(self, names: Iterable[str] | None = None) -> dict[str, UsageTotals]:
        wanted = sorted(self._totals) if names is None else list(names)
        return {name: UsageTotals(**vars_of(self._totals.get(name, UsageTotals()))) for name in wanted}


def vars_of(totals: UsageTotals) -> dict[str, int]:
    return {field: getattr(totals, field) for field in _FIELDS}


class RedisLedger(UsageLedger):
    def __init__(self, redis: Redis, *, prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{prefix}usage:"

    async def record(self, name: str, *, images: int, megapixels: float, cost_usd: float) -> None:
        with unavailable_as_503("counting usage"):
            pipe = self._redis.pipeline(transaction=True)
            for field, amount in self._increments(images, megapixels, cost_usd).items():
                pipe.hincrby(self._prefix + name, field, amount)
            pipe.sadd(self._prefix + "keys", name)
            await pipe.execute()

    async def totals(self, names: Iterable[str] | None = None) -> dict[str, UsageTotals]:
        with unavailable_as_503("reading usage"):
            if names is None:
                names = sorted(
                    n.decode() if isinstance(n, bytes) else str(n)
                    for n in await self._redis.smembers(self._prefix + "keys")
                )
            wanted = list(names)
            pipe = self._redis.pipeline(transaction=False)
            for name in wanted:
                pipe.hgetall(self._prefix + name)
            rows = await pipe.execute()
        out: dict[str, UsageTotals] = {}
        for name, row in zip(wanted, rows, strict=True):
            values = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in row.items()}
            out[name] = UsageTotals(**{f: values.get(f, 0) for f in _FIELDS})
        return out
