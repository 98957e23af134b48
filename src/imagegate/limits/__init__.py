"""Per-key limits (`rpm`, `images_per_minute`, `max_concurrent`), checked before any upstream call.

`Limiter.admit(name, limits, images)` is an async context manager: it admits the request or raises
`RateLimitExceeded` (429 `rate_limit_exceeded`, with `retry-after` and OpenAI's `x-ratelimit-*`
headers), and holds a concurrency slot until the block exits, however it exits. `MemoryLimiter`
serves one process; `RedisLimiter` shares one budget between every instance on the same Redis.
"""

from imagegate.limits.base import (
    Admission,
    Decision,
    Limiter,
    RateLimitExceeded,
    format_reset,
    refuse_unadmittable,
)
from imagegate.limits.memory import MemoryLimiter
from imagegate.limits.redis_limiter import RedisLimiter

__all__ = [
    "Admission",
    "Decision",
    "Limiter",
    "MemoryLimiter",
    "RateLimitExceeded",
    "RedisLimiter",
    "format_reset",
    "refuse_unadmittable",
]
