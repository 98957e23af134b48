"""The real Redis the tests use: `$IMAGEGATE_TEST_REDIS_URL` (default redis://127.0.0.1:6379/0).

Every test gets a key prefix of its own (`imagegate-test:<uuid>:`) and its keys are deleted after
it (by prefix; never FLUSHDB). Set `IMAGEGATE_TEST_REDIS_URL=` (empty) to skip the Redis tests.
Import the fixtures into a test module: `from tests.redis_support import redis_prefix, redis_url`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

REDIS_URL = os.environ.get("IMAGEGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not REDIS_URL:
        pytest.skip("IMAGEGATE_TEST_REDIS_URL is empty: the Redis tests are off")
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"imagegate-test:{uuid.uuid4().hex}:"
    yield prefix
    delete_prefix(redis_url, prefix)


def delete_prefix(url: str, prefix: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix.replace("*", r"\*") + "*", count=500))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def keys_with(url: str, prefix: str) -> list[str]:
    client = redis.Redis.from_url(url)
    try:
        return sorted(k.decode() for k in client.scan_iter(match=prefix + "*", count=500))
    finally:
        client.close()
