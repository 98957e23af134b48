"""`RedisLimiter`: one budget for every instance on the same Redis.

One Lua script checks and takes all three limits atomically, on Redis's own clock (`TIME`), so
there is no read-modify-write race between instances and no clock skew between them. Keys, under
`<prefix>limits:<key name>:`, are sorted sets: `req` (one member per admitted request, scored by
its time), `img` (one member per image), `slots` (one member per request in flight, scored by
the end of its lease). A slot's lease is renewed while the request runs and removed when it ends;
a crashed process's slots expire with their lease instead of leaking.
"""

from __future__ import annotations

from redis.asyncio import Redis

from imagegate.auth.keys import KeyLimits
from imagegate.limits.base import WINDOW_SECONDS, Decision, Limiter, Refusal
from imagegate.state.redis import unavailable_as_503

__all__ = ["RedisLimiter"]

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, ipm, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local maxc, lease, token, window = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local reqs, imgs = 0, 0
local function expiry(key, index)
  local e = redis.call('ZRANGE', key, index, index, 'WITHSCORES')
  if e[2] then return math.max(0, tonumber(e[2]) + window - now) end
  return 0
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  reqs = redis.call('ZCARD', KEYS[1])
  if reqs >= rpm then
    local wait = expiry(KEYS[1], reqs - rpm)
    return {1, reqs, imgs, wait, 0, wait}
  end
end
if ipm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  imgs = redis.call('ZCARD', KEYS[2])
  if n > ipm then return {4, reqs, imgs, 0, 0, 0} end
  if imgs + n > ipm then
    local wait = expiry(KEYS[2], imgs + n - ipm - 1)
    return {2, reqs, imgs, 0, wait, wait}
  end
end
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= maxc then return {3, reqs, imgs, 0, 0, 1000} end
  redis.call('ZADD', KEYS[3], now + lease, token)
  redis.call('PEXPIRE', KEYS[3], lease)
end
local reset_req, reset_img = 0, 0
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, token)
  redis.call('PEXPIRE', KEYS[1], window)
  reqs = reqs + 1
  reset_req = expiry(KEYS[1], 0)
end
if ipm > 0 then
  for i = 1, n do redis.call('ZADD', KEYS[2], now, token .. ':' .. i) end
  redis.call('PEXPIRE', KEYS[2], window)
  imgs = imgs + n
  reset_img = expiry(KEYS[2], 0)
end
return {0, reqs, imgs, reset_req, reset_img, 0}
"""

_RENEW = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

_REFUSALS: dict[int, Refusal] = {1: "requests", 2: "images", 3: "concurrency", 4: "too_many_images"}


class RedisLimiter(Limiter):
    def __init__(self, redis: Redis, *, prefix: str, lease_seconds: float = 30.0) -> None:
        self._redis = redis
        self._prefix = f"{prefix}limits:"
        self.lease_seconds = lease_seconds
        self._acquire_script = redis.register_script(_ACQUIRE)
        self._renew_script = redis.register_script(_RENEW)

    def _keys(self, name: str) -> list[str]:
        base = f"{self._prefix}{name}:"
        return [base + "req", base + "img", base + "slots"]

    async def _acquire(self, name: str, limits: KeyLimits, images: int, token: str) -> Decision:
        args: list[int | str] = [
            limits.rpm or 0,
            limits.images_per_minute or 0,
            images,
            limits.max_concurrent or 0,
            round(self.lease_seconds * 1000),
            token,
            round(WINDOW_SECONDS * 1000),
        ]
        with unavailable_as_503("checking rate limits"):
            raw = await self._acquire_script(keys=self._keys(name), args=args)
        code, reqs, imgs, reset_req, reset_img, retry = (int(v) for v in raw)
        return Decision(
            _REFUSALS.get(code),
            requests=reqs,
            images=imgs,
            reset_requests=reset_req / 1000,
            reset_images=reset_img / 1000,
            retry_after=retry / 1000,
        )

    async def _release(self, name: str, token: str) -> None:
        with unavailable_as_503("releasing a concurrency slot"):
            await self._redis.zrem(self._keys(name)[2], token)

    async def _renew(self, name: str, token: str) -> None:
        with unavailable_as_503("renewing a concurrency slot"):
            await self._renew_script(keys=[self._keys(name)[2]], args=[token, round(self.lease_seconds * 1000)])

    async def in_flight(self, name: str) -> int:
        count: int = await self._redis.zcard(self._keys(name)[2])
        return count
