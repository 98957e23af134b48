"""A request with hundreds of extra fields: every response stays readable by a real HTTP client,
and a paid job is never lost to a response head too big to parse (the SDK would then retry it).

The gateway runs under uvicorn on 127.0.0.1 with the fake fal behind it (fal routes pass extra
fields through, and report each one in `x-imagegate-params`). Response heads must stay small:
Node's HTTP parser (the Node SDK) refuses heads above 16 KiB, nginx's default proxy buffer is
4-8 KiB, httpx's parser stops at 100 KiB; a refused head makes an SDK retry a paid job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from tests.conftest import gateway_settings
from tests.fakes.fal import FakeFal
from tests.fakes.images import png_bytes
from tests.fakes.server import LocalServer

from imagegate.app import create_app
from imagegate.core.plan import MAX_PARAMS_HEADER_CHARS

FIELD = "x" * 60  # names are at most 64 characters


@pytest.fixture(scope="module")
def fal() -> Iterator[tuple[FakeFal, str]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv.url


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fal: tuple[FakeFal, str]) -> Iterator[str]:
    url = fal[1]
    settings = gateway_settings(
        tmp_path_factory.mktemp("flood"),
        models={"fal-edit": {"routes": [{"provider": "fal", "model": "fal-ai/qwen-image-edit-2511"}]}},
        providers={"fal": {"key": "test-fal-key", "queue_url": url, "run_url": url + "/sync", "rest_url": url,
                           "poll_interval": 0.01, "poll_max_interval": 0.05}},
    )  # fmt: skip
    with LocalServer(create_app(settings)) as srv:
        yield srv.url


def test_a_paid_job_with_hundreds_of_extra_fields_answers_a_readable_response(
    gateway: str, fal: tuple[FakeFal, str]
) -> None:
    fake = fal[0]
    fake.reset()
    sdk = openai.OpenAI(base_url=gateway + "/v1", api_key="unused")  # default retries: 2
    extra = {f"{FIELD}{i:03d}": i for i in range(250)}
    result = sdk.images.edit(model="fal-edit", image=("a.png", png_bytes(64, 64)), prompt="cat", extra_body=extra)
    assert result.data and len(fake.submits) == 1  # paid once, and the answer reached the client
    response = httpx.post(
        gateway + "/v1/images/edits",
        data={"model": "fal-edit", "prompt": "cat", **{k: str(v) for k, v in extra.items()}},
        files={"image": ("a.png", png_bytes(64, 64), "image/png")},
        timeout=30,
    )
    assert response.status_code == 200
    report = response.headers["x-imagegate-params"]
    assert len(report) <= MAX_PARAMS_HEADER_CHARS
    assert report.endswith("; (more omitted)")


def test_a_json_body_with_more_fields_than_a_form_may_have_is_a_400(gateway: str, fal: tuple[FakeFal, str]) -> None:
    fake = fal[0]
    fake.reset()
    body = {"model": "fal-edit", "prompt": "cat", **{f"f{i}": i for i in range(300)}}
    response = httpx.post(
        gateway + "/v1/images/generations",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "too_many_parameters"
    assert "256" in error["message"]
    assert not fake.submits and not fake.runs
