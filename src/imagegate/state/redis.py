"""The one shared redis-py asyncio client (a connection pool), built by the app when `redis.url` is set.

`connect(settings)` returns the client, or None for in-memory state; the app keeps it as
`app.state.redis` and closes it at shutdown. Commands are bounded by `redis.timeout_seconds` and
retried once at most, so an outage surfaces in about that time. Code that talks to Redis wraps
the calls in `unavailable_as_503()`: any Redis failure becomes `StateUnavailable`, a clean 503 in
OpenAI's envelope (never a hang, never a 500 with a traceback). `ping(client)` is the readiness check.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from imagegate.core.errors import GatewayError
from imagegate.settings import RedisSettings

__all__ = ["Redis", "StateUnavailable", "connect", "ping", "unavailable_as_503"]

log = logging.getLogger("imagegate.state")


class StateUnavailable(GatewayError):
    """503: the shared state store (Redis) did not answer."""

    status = 503
    type = "server_error"
    code = "state_unavailable"


def connect(settings: RedisSettings) -> Redis | None:
    """A pooled client for `settings.url` (no connection is opened until the first command)."""
    if not settings.url:
        return None
    client: Redis = Redis.from_url(
        settings.url,
        socket_timeout=settings.timeout_seconds,
        socket_connect_timeout=settings.timeout_seconds,
        retry=Retry(NoBackoff(), 1),
        max_connections=256,
        health_check_interval=30,
    )
    return client


async def ping(client: Redis) -> bool:
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        log.warning("readiness: Redis did not answer", exc_info=True)
        return False


@contextmanager
def unavailable_as_503(what: str) -> Iterator[None]:
    """Turn a Redis failure inside the block into `StateUnavailable` (logged without a traceback)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        log.warning("Redis failed while %s: %s", what, exc)
        raise StateUnavailable(
            "The gateway's shared state store is unavailable; please retry shortly.", retry_after=1.0
        ) from None
