"""A gateway with client keys in front of the fake fal, for the access tests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.conftest import gateway_settings
from tests.fakes.fal import FakeFal
from tests.fakes.server import LocalServer

from imagegate.app import create_app
from imagegate.settings import Settings

TEAM_A = "sk-team-a-0123456789"
TEAM_B = "sk-team-b-9876543210"
OPS = "sk-ops-admin-5555"

KEYS: list[dict[str, Any]] = [
    {"name": "team-a", "key": TEAM_A, "models": ["fal-image", "sandbox-image"]},
    {"name": "team-b", "key_sha256": hashlib.sha256(TEAM_B.encode()).hexdigest()},
    {"name": "ops", "key": OPS, "admin": True, "models": ["sandbox-image"]},
]

MODELS: dict[str, Any] = {
    "fal-image": {"routes": [{"provider": "fal", "model": "fal-ai/qwen-image", "price": {"per_image": 0.03}}]},
    "sandbox-image": {"routes": [{"provider": "sandbox", "model": "sandbox-image", "price": {"per_megapixel": 0.02}}]},
    "sandbox-edit": {"routes": [{"provider": "sandbox", "model": "sandbox-edit"}]},
}


@pytest.fixture(scope="module")
def fal() -> Iterator[tuple[FakeFal, LocalServer]]:
    """The fake fal for a test module."""
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The `redis:` settings of a test run twice: in memory, then on the real Redis."""
    if request.param == "memory":
        return {}
    return {"url": request.getfixturevalue("redis_url"), "key_prefix": request.getfixturevalue("redis_prefix")}


def access_settings(tmp_path: Path, fal_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "auth": {"keys": KEYS},
        "models": MODELS,
        "routing": {"backoff_base": 0.01, "backoff_max": 0.05, "deadline_seconds": 20},
        "providers": {
            "fal": {
                "key": "test-fal-key",
                "queue_url": fal_url,
                "run_url": fal_url + "/sync",
                "rest_url": fal_url,
                "poll_interval": 0.01,
                "poll_max_interval": 0.02,
            }
        },
    }
    base.update(overrides)
    return gateway_settings(tmp_path, **base)


def gateway(settings: Settings) -> LocalServer:
    return LocalServer(create_app(settings))


def sdk(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def raw(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=30)
