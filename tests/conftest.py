"""Shared fixtures: a gateway app on a temporary storage directory, and the official OpenAI SDK
pointed at it in-process (httpx2.ASGITransport; openai 3.x uses the httpx2 package)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI

from imagegate.app import create_app
from imagegate.settings import Settings, load_settings


def gateway_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """The packaged default config with storage in tmp_path and no provider keys from the environment."""
    base: dict[str, Any] = {
        "storage": {"path": str(tmp_path / "images")},
        "providers": {
            "fal": {"key": None, "key_id": None, "key_secret": None},
            "replicate": {"api_token": None},
            "openai": {"api_key": None},
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = value
    return load_settings(None, **base)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return gateway_settings(tmp_path)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):  # closes the upstream client and pool
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
        yield c


@pytest.fixture
async def sdk(app: FastAPI) -> AsyncIterator[openai.AsyncOpenAI]:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway")
    async with openai.AsyncOpenAI(
        api_key="unused", base_url="http://gateway/v1", http_client=http, max_retries=0
    ) as c:
        yield c
