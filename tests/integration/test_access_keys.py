"""Client keys through the official openai SDK and raw HTTP: 401 / 403 / 200, both headers, the
model list per key, the open routes, and the open gateway's warning."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from tests.fakes.fal import FakeFal
from tests.fakes.server import LocalServer

from imagegate.app import create_app

from .access_support import OPS, TEAM_A, TEAM_B, access_settings, fal, gateway, sdk

__all__ = ["fal"]


@pytest.fixture
def url(tmp_path: Path, fal: tuple[FakeFal, LocalServer]) -> Iterator[str]:
    with gateway(access_settings(tmp_path, fal[1].url)) as srv:
        yield srv.url


async def test_unknown_or_missing_key_is_401_in_openais_envelope(url: str) -> None:
    for key in ("sk-wrong", TEAM_A + "x", TEAM_A[:-1]):
        with pytest.raises(openai.AuthenticationError) as info:
            await sdk(url, key).images.generate(model="sandbox-image", prompt="x")
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        assert info.value.body == {
            "message": "Incorrect API key provided.",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
        assert key not in info.value.response.text
    async with httpx.AsyncClient(base_url=url) as http:
        missing = await http.post("/v1/images/generations", json={"model": "sandbox-image", "prompt": "x"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["x-request-id"].startswith("req_")


async def test_model_outside_the_keys_list_is_403(url: str) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        await sdk(url, TEAM_A).images.generate(model="sandbox-edit", prompt="x")
    assert info.value.status_code == 403
    assert info.value.body == {
        "message": "The API key 'team-a' may not use the model `sandbox-edit`.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_allowed",
    }


async def test_allowed_key_is_200_with_bearer_and_with_api_key_header(url: str) -> None:
    result = await sdk(url, TEAM_A).images.generate(
        model="sandbox-image", prompt="a lighthouse", size="64x64", response_format="b64_json"
    )
    assert result.data and result.data[0].b64_json
    result = await sdk(url, TEAM_B).images.generate(model="sandbox-image", prompt="x", size="64x64")  # key_sha256
    assert result.data and result.data[0].url
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.post(
            "/v1/images/generations",
            json={"model": "sandbox-image", "prompt": "x", "size": "64x64"},
            headers={"api-key": TEAM_A},
        )
        assert response.status_code == 200, response.text
        wrong = await http.get("/v1/models", headers={"api-key": "nope"})
        assert wrong.status_code == 401
        lowercase_scheme = await http.get("/v1/models", headers={"authorization": f"bearer {TEAM_B}"})
        assert lowercase_scheme.status_code == 200


async def test_models_are_filtered_per_key(url: str) -> None:
    team_a = [m.id async for m in sdk(url, TEAM_A).models.list()]
    assert sorted(team_a) == ["fal-image", "sandbox-image"]
    assert [m.id async for m in sdk(url, OPS).models.list()] == ["sandbox-image"]
    everything = {m.id async for m in sdk(url, TEAM_B).models.list()}  # no allow-list: the whole catalog
    assert {"fal-image", "sandbox-edit", "sandbox-image", "qwen-image-edit-2511"} <= everything
    assert (await sdk(url, TEAM_A).models.retrieve("fal-image")).id == "fal-image"
    with pytest.raises(openai.NotFoundError):
        await sdk(url, TEAM_A).models.retrieve("sandbox-edit")
    with pytest.raises(openai.AuthenticationError):
        await sdk(url, "sk-wrong").models.list()


async def test_health_metrics_and_files_stay_open(url: str) -> None:
    result = await sdk(url, TEAM_A).images.generate(model="sandbox-image", prompt="x", size="64x64")
    assert result.data and result.data[0].url
    async with httpx.AsyncClient() as http:
        image = await http.get(result.data[0].url)  # no key: its id is unguessable
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        for path in ("/healthz", "/readyz"):
            assert (await http.get(url + path)).status_code == 200
        assert (await http.get(url + "/metrics")).status_code != 401
        assert (await http.get(url + "/v1/usage")).status_code == 401
        for sneaky in ("/v1/files/images/../../v1/models", "/v1/files/images/x/../../../v1/usage", "/v1/files/images/"):
            raw = httpx.Request("GET", url + "/v1/models")
            raw.url = raw.url.copy_with(raw_path=sneaky.encode())
            assert (await http.send(raw)).status_code == 401  # only one plain segment is open


def test_open_gateway_warns_once_and_serves_without_a_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.conftest import gateway_settings

    with caplog.at_level(logging.WARNING, logger="imagegate"):
        app = create_app(gateway_settings(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if "open to anyone" in r.getMessage()]
    assert warnings == ["no client keys are configured (auth.keys): the gateway is open to anyone who can reach it"]
    with LocalServer(app) as srv:
        response = httpx.post(srv.url + "/v1/images/generations", json={"model": "sandbox-image", "prompt": "x"})
        assert response.status_code == 200
        assert response.headers["x-imagegate-cost-usd"] == "0.0000"
        usage = httpx.get(srv.url + "/v1/usage").json()["data"]
        assert [(row["key"], row["requests"], row["images"]) for row in usage] == [("anonymous", 1, 1)]


def test_an_allow_list_naming_an_unknown_model_fails_at_start(tmp_path: Path) -> None:
    keys = [{"name": "a", "key": "x", "models": ["sandbox-image", "no-such-model"]}]
    with pytest.raises(ValueError, match=r"auth key 'a': unknown model.*no-such-model"):
        access_settings(tmp_path, "http://127.0.0.1:9", auth={"keys": keys})


def test_a_key_from_an_unset_variable_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of `key` and `key_sha256`"):
        access_settings(tmp_path, "http://127.0.0.1:9", auth={"keys": [{"name": "a", "key": ""}]})
    with pytest.raises(ValueError, match="'anonymous' is reserved"):
        access_settings(tmp_path, "http://127.0.0.1:9", auth={"keys": [{"name": "anonymous", "key": "x"}]})
    with pytest.raises(ValueError, match="its own `name`"):
        access_settings(
            tmp_path, "http://127.0.0.1:9", auth={"keys": [{"name": "a", "key": "x"}, {"name": "a", "key": "y"}]}
        )
