"""End to end: the gateway under uvicorn on 127.0.0.1, the official openai SDK over real HTTP, and
protocol-faithful fake fal and Replicate servers behind it."""

from __future__ import annotations

import base64
import io
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from tests.conftest import gateway_settings
from tests.fakes.fal import FakeFal, FalScenario, rate_limited, runner_scheduling_failure, validation_error
from tests.fakes.images import png_bytes
from tests.fakes.replicate import FakeReplicate, ReplicateScenario, throttled
from tests.fakes.server import LocalServer, wait_until

from imagegate.app import create_app


@pytest.fixture(scope="module")
def fal() -> Iterator[tuple[FakeFal, LocalServer]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv


@pytest.fixture(scope="module")
def replicate() -> Iterator[tuple[FakeReplicate, LocalServer]]:
    fake = FakeReplicate()
    with LocalServer(fake.app) as srv:
        yield fake, srv


@pytest.fixture
def gateway(
    tmp_path: Path, fal: tuple[FakeFal, LocalServer], replicate: tuple[FakeReplicate, LocalServer]
) -> Iterator[tuple[str, Any]]:
    fal_fake, fal_srv = fal
    rep_fake, rep_srv = replicate
    fal_fake.reset()
    rep_fake.reset()
    fal_fake.scenario = FalScenario(queue_polls=2, progress_polls=2)
    rep_fake.scenario = ReplicateScenario()
    settings = gateway_settings(
        tmp_path,
        routing={"backoff_base": 0.01, "backoff_max": 0.05, "deadline_seconds": 20},
        models={
            "rep-edit": {"routes": [{"provider": "replicate", "model": "qwen/qwen-image-edit-2511"}]},
            "fal-edit": {"routes": [{"provider": "fal", "model": "fal-ai/qwen-image-edit-2511"}]},
        },
        providers={
            "fal": {
                "key": "test-fal-key",
                "queue_url": fal_srv.url,
                "inline_max_bytes": 20_000,
                "run_url": fal_srv.url + "/sync",
                "rest_url": fal_srv.url,
                "poll_interval": 0.01,
                "poll_max_interval": 0.05,
            },
            "replicate": {
                "api_token": "r8_test-token",
                "base_url": rep_srv.url + "/v1",
                "wait_seconds": 1,
                "inline_max_bytes": 20_000,
                "poll_interval": 0.01,
                "poll_max_interval": 0.05,
            },
        },
    )
    app = create_app(settings)
    with LocalServer(app) as srv:
        yield srv.url, app


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def decode_b64(item: Any) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    image.load()
    return image


def test_sandbox_over_real_http(gateway: tuple[str, Any]) -> None:
    url, _ = gateway
    client = sdk(url)
    result = client.images.edit(
        model="sandbox-edit",
        image=[png_bytes(50, 40), ("b.png", png_bytes(50, 40))],
        prompt="grayscale",
        size="200x100",
        output_format="webp",
    )
    assert result.data and result.data[0].url and result.data[0].url.startswith(url + "/v1/files/images/")
    image = Image.open(io.BytesIO(httpx.get(result.data[0].url).content))
    assert image.size == (200, 100) and image.format == "WEBP"


def test_fal_queue_flow_end_to_end(gateway: tuple[str, Any], fal: tuple[FakeFal, LocalServer]) -> None:
    url, _ = gateway
    fake, _ = fal
    raw = sdk(url).images.with_raw_response.edit(
        model="qwen-image-edit-2511",
        image=("a.png", png_bytes(64, 48)),
        prompt="make it red",
        size="1024x768",
        n=2,
        response_format="b64_json",
        extra_body={"acceleration": "high", "seed": 9},
    )
    result = raw.parse()
    assert [decode_b64(d).size for d in result.data] == [(1024, 768), (1024, 768)]
    assert raw.headers["x-imagegate-provider"] == "fal"
    job = fake.last_submit
    assert job.endpoint_id == "fal-ai/qwen-image-edit-2511"
    assert job.input["image_size"] == "landscape_4_3"
    assert job.input["num_images"] == 2 and job.input["seed"] == 9 and job.input["acceleration"] == "high"
    assert job.input["image_urls"][0].startswith("data:image/png;base64,")
    assert job.headers["authorization"] == "Key test-fal-key"
    assert raw.headers["x-imagegate-upstream-request-id"] == job.request_id


def test_fal_503_every_time_falls_back_to_replicate(
    gateway: tuple[str, Any], fal: tuple[FakeFal, LocalServer], replicate: tuple[FakeReplicate, LocalServer]
) -> None:
    url, _ = gateway
    fal[0].scenario = FalScenario(always_fail_submit=runner_scheduling_failure())
    raw = sdk(url).images.with_raw_response.edit(
        model="qwen-image-edit-2511",
        image=("a.png", png_bytes(64, 48)),
        prompt="x",
        size="16:9",
        response_format="b64_json",
    )
    assert raw.http_response.status_code == 200
    assert raw.headers["x-imagegate-provider"] == "replicate"
    assert decode_b64(raw.parse().data[0]).size == (1365, 768)  # Replicate's 16:9 resized to the exact preset
    assert replicate[0].last_create.input["aspect_ratio"] == "16:9"
    assert len(fal[0].rejected_submits) >= 1


def test_replicate_429_then_success(
    gateway: tuple[str, Any], fal: tuple[FakeFal, LocalServer], replicate: tuple[FakeReplicate, LocalServer]
) -> None:
    url, _ = gateway
    fal[0].scenario = FalScenario(always_fail_submit=runner_scheduling_failure())
    replicate[0].scenario = ReplicateScenario(create_errors=[throttled(0)])
    result = sdk(url).images.generate(model="qwen-image", prompt="x", response_format="b64_json")
    assert result.data and len(replicate[0].rejected_creates) == 1


def test_content_policy_is_a_400_and_no_fallback(
    gateway: tuple[str, Any], fal: tuple[FakeFal, LocalServer], replicate: tuple[FakeReplicate, LocalServer]
) -> None:
    url, _ = gateway
    fal[0].scenario = FalScenario.content_policy()
    with pytest.raises(openai.BadRequestError) as info:
        sdk(url).images.generate(model="qwen-image", prompt="something flagged")
    assert info.value.code == "content_policy_violation"
    assert replicate[0].creates == []


def test_client_disconnect_cancels_the_fal_job(gateway: tuple[str, Any], fal: tuple[FakeFal, LocalServer]) -> None:
    url, _ = gateway
    fake, _ = fal
    fake.scenario = FalScenario.hang()
    body = b'{"model": "qwen-image", "prompt": "slow"}'
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_until(lambda: len(fake.submits) == 1, timeout=5)
        assert wait_until(lambda: len(fake.status_polls) + len(fake.stream_opens) >= 1, timeout=5)
    started = time.monotonic()
    assert wait_until(lambda: fake.cancels == [fake.last_submit.request_id], timeout=5)
    assert time.monotonic() - started < 5


def noisy_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: larger than the inline data-URI threshold."""
    image = Image.frombytes("RGB", (width, height), random.Random(0).randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_fal_503_then_success_is_retried(gateway: tuple[str, Any], fal: tuple[FakeFal, LocalServer]) -> None:
    url, _ = gateway
    fal[0].scenario = FalScenario(submit_errors=[runner_scheduling_failure(with_request_id=False), rate_limited(0)])
    raw = sdk(url).images.with_raw_response.generate(model="qwen-image", prompt="x", response_format="b64_json")
    assert raw.headers["x-imagegate-provider"] == "fal"
    assert len(fal[0].rejected_submits) == 2 and len(fal[0].submits) == 1


def test_fal_validation_error_is_a_400_naming_the_openai_param(
    gateway: tuple[str, Any], fal: tuple[FakeFal, LocalServer], replicate: tuple[FakeReplicate, LocalServer]
) -> None:
    url, _ = gateway
    fal[0].scenario = FalScenario(result_error=validation_error("guidance_scale", "Input should be less than 20"))
    with pytest.raises(openai.BadRequestError) as info:
        sdk(url).images.generate(model="qwen-image", prompt="x", extra_body={"cfg_scale": 7})
    assert info.value.param == "cfg_scale" and "less than 20" in info.value.message
    assert replicate[0].creates == []  # a client error never falls back


def test_fal_large_input_goes_through_storage_upload(
    gateway: tuple[str, Any], fal: tuple[FakeFal, LocalServer]
) -> None:
    url, _ = gateway
    big = noisy_png(160, 120)
    assert len(big) > 20_000
    result = sdk(url).images.edit(
        model="fal-edit",
        image=[("small.png", png_bytes(8, 8)), ("big.png", big)],
        prompt="x",
        response_format="b64_json",
    )
    assert result.data
    upload = fal[0].uploads[0]
    assert upload.data == big and upload.content_type == "image/png"
    small_ref, big_ref = fal[0].last_submit.input["image_urls"]
    assert small_ref.startswith("data:image/png;base64,") and big_ref.startswith("http://127.0.0.1")


def test_replicate_large_input_goes_through_files_api(
    gateway: tuple[str, Any], replicate: tuple[FakeReplicate, LocalServer]
) -> None:
    url, _ = gateway
    big = noisy_png(160, 120)
    result = sdk(url).images.edit(model="rep-edit", image=("big.png", big), prompt="x", response_format="b64_json")
    assert result.data
    assert replicate[0].uploads[0].data == big
    assert replicate[0].last_create.input["image"][0].startswith(replicate[1].url + "/v1/files/")


def test_replicate_processing_with_output_counts_as_done(
    gateway: tuple[str, Any], replicate: tuple[FakeReplicate, LocalServer]
) -> None:
    url, _ = gateway
    replicate[0].scenario = ReplicateScenario(early_output=True, processing_ticks=None)
    result = sdk(url).images.edit(
        model="rep-edit", image=("a.png", png_bytes(64, 64)), prompt="x", response_format="b64_json", size="512x512"
    )
    assert decode_b64(result.data[0]).size == (512, 512)
    prediction = replicate[0].last_create
    assert prediction.scheduled_status() == "processing" and not prediction.canceled  # done on the output alone


def test_replicate_data_uri_output(gateway: tuple[str, Any], replicate: tuple[FakeReplicate, LocalServer]) -> None:
    url, _ = gateway
    replicate[0].scenario = ReplicateScenario(output_kind="data_uri")
    result = sdk(url).images.edit(
        model="rep-edit",
        image=("a.png", png_bytes(64, 64)),
        prompt="x",
        response_format="b64_json",
        output_format="jpeg",
    )
    assert decode_b64(result.data[0]).format == "JPEG"
    assert replicate[0].last_create.input["output_format"] == "jpg"


def test_replicate_aborted_is_a_timeout(gateway: tuple[str, Any], replicate: tuple[FakeReplicate, LocalServer]) -> None:
    url, _ = gateway
    replicate[0].scenario = ReplicateScenario(outcome="aborted")
    with pytest.raises(openai.InternalServerError) as info:
        sdk(url).images.edit(model="rep-edit", image=("a.png", png_bytes(64, 64)), prompt="x")
    assert info.value.status_code == 504 and info.value.code == "upstream_timeout"


def test_replicate_disconnect_cancels_the_prediction(
    gateway: tuple[str, Any], replicate: tuple[FakeReplicate, LocalServer]
) -> None:
    url, _ = gateway
    fake = replicate[0]
    fake.scenario = ReplicateScenario.hang()
    with httpx.Client(base_url=url, timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post(
            "/v1/images/edits",
            files={"image": ("a.png", png_bytes(16, 16))},
            data={"model": "rep-edit", "prompt": "slow"},
        )  # the client gives up and hangs up
    assert wait_until(lambda: len(fake.cancels) == 1, timeout=5)
    assert fake.cancels == [fake.last_create.id]


def test_sdk_does_not_retry_a_costly_failure(
    gateway: tuple[str, Any], replicate: tuple[FakeReplicate, LocalServer]
) -> None:
    url, _ = gateway
    replicate[0].scenario = ReplicateScenario(outcome="failed", error="CUDA out of memory (E1001)")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=2)  # the SDK's default retries
    with pytest.raises(openai.InternalServerError) as info:
        client.images.edit(model="rep-edit", image=("a.png", png_bytes(32, 32)), prompt="x")
    assert info.value.status_code == 502 and info.value.response.headers["x-should-retry"] == "false"
    assert len(replicate[0].creates) == 1  # one paid prediction, not three
