"""Redis going away: `/readyz` fails, a request that needs Redis is a clean 503 (refused or
black-holed connections alike, within the command timeout), and a request whose upstream work
is already done still gets its images."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import redis
from tests.conftest import gateway_settings
from tests.fakes.server import LocalServer, wait_until
from tests.redis_support import redis_prefix, redis_url
from tests.tcp_proxy import TcpProxy

from imagegate.app import create_app

__all__ = ["redis_prefix", "redis_url"]

KEY = "sk-outage-test"
TIMEOUT = 0.5


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    with TcpProxy(urlsplit(redis_url).port or 6379, urlsplit(redis_url).hostname or "127.0.0.1") as p:
        yield p


@pytest.fixture
def url(tmp_path: Path, proxy: TcpProxy, redis_url: str, redis_prefix: str) -> Iterator[str]:
    db = urlsplit(redis_url).path or "/0"
    settings = gateway_settings(
        tmp_path,
        auth={"keys": [{"name": "k", "key": KEY, "rpm": 100, "max_concurrent": 4}]},
        redis={
            "url": f"redis://127.0.0.1:{proxy.port}{db}",
            "key_prefix": redis_prefix,
            "timeout_seconds": TIMEOUT,
            "lease_seconds": 3,
        },
        providers={"sandbox": {"delay_seconds": 1.0}},
    )
    with LocalServer(create_app(settings)) as srv:
        yield srv.url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=20)


@pytest.mark.parametrize("mode", ["down", "blackhole"])
def test_readyz_and_requests_fail_cleanly_while_redis_is_away(url: str, proxy: TcpProxy, mode: Any) -> None:
    assert httpx.get(url + "/readyz").status_code == 200
    client(url).images.generate(model="sandbox-image", prompt="x", size="64x64")
    proxy.mode = mode
    started = time.monotonic()
    ready = httpx.get(url + "/readyz", timeout=10)
    assert ready.status_code == 503 and "Redis is unreachable" in ready.json()["error"]["message"]
    with pytest.raises(openai.InternalServerError) as info:
        client(url).images.generate(model="sandbox-image", prompt="x", size="64x64")
    assert time.monotonic() - started < 6 * TIMEOUT + 2  # bounded by the command timeout, never a hang
    error = info.value
    assert error.status_code == 503
    assert error.body == {  # no traceback, no internals
        "message": "The gateway's shared state store is unavailable; please retry shortly.",
        "type": "server_error",
        "param": None,
        "code": "state_unavailable",
    }
    assert error.response.headers["retry-after"] == "1"
    proxy.mode = "up"
    assert httpx.get(url + "/readyz").status_code == 200
    assert client(url).images.generate(model="sandbox-image", prompt="x", size="64x64").data


def test_outage_after_the_upstream_work_still_answers(
    url: str, proxy: TcpProxy, redis_url: str, redis_prefix: str
) -> None:
    results: list[Any] = []

    def call() -> None:
        raw = client(url).images.with_raw_response.generate(
            model="sandbox-image", prompt="x", size="64x64", extra_headers={"Idempotency-Key": "mid"}
        )
        results.append(raw)

    thread = threading.Thread(target=call)
    thread.start()
    direct = redis.Redis.from_url(redis_url)
    slots = f"{redis_prefix}limits:k:slots"
    assert wait_until(lambda: direct.zcard(slots) == 1, timeout=10)  # admitted: the (slow) provider works
    direct.close()
    proxy.mode = "down"
    thread.join(15)
    assert len(results) == 1
    raw = results[0]
    assert raw.http_response.status_code == 200 and raw.parse().data
    assert raw.headers["x-imagegate-cost-usd"] == "0.0000"
