"""Secrets never leak: not in responses, error messages, or logs."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from tests.conftest import gateway_settings
from tests.fakes.fal import FakeFal
from tests.fakes.replicate import FakeReplicate
from tests.fakes.server import LocalServer

from imagegate.app import create_app

FAL_SECRET = "fal-secret-4f9d2c"
REPLICATE_SECRET = "r8_secret_77ab31"


async def test_rejected_keys_are_never_echoed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with LocalServer(FakeFal(key="another-key").app) as fal, LocalServer(FakeReplicate(token="other").app) as rep:
        settings = gateway_settings(
            tmp_path,
            providers={
                "fal": {"key": FAL_SECRET, "queue_url": fal.url, "run_url": fal.url + "/sync", "rest_url": fal.url,
                        "poll_interval": 0.01},
                "replicate": {"api_token": REPLICATE_SECRET, "base_url": rep.url + "/v1", "poll_interval": 0.01},
            },
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw"
        ) as client:
            response = await client.post("/v1/images/generations", json={"model": "qwen-image", "prompt": "x"})
            settings_dump = await client.get("/v1/models")
    assert response.status_code == 502
    body = response.json()["error"]
    assert body["code"] == "upstream_auth_failed"
    for secret in (FAL_SECRET, REPLICATE_SECRET):
        assert secret not in response.text
        assert secret not in settings_dump.text
        assert secret not in caplog.text
    assert repr(settings.providers.fal.key) == "SecretStr('**********')"
