"""`imagegate serve` as a real process: graceful shutdown on SIGTERM (with the fake fal), metrics
aggregated across `--workers 2`, and JSON request logs without secrets."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.fakes.fal import FakeFal, FalScenario
from tests.fakes.images import image_info, png_bytes
from tests.fakes.server import LocalServer, wait_until
from tests.integration.gateway_process import GatewayProcess, write_config
from tests.observability.promtext import parse, value
from tests.redis_support import redis_prefix, redis_url  # noqa: F401 - fixtures

from imagegate.settings import Settings

FAL_MODEL = "fal-ai/qwen-image-edit-2511"
FAL_KEY = "fal-key-id:fal-key-secret-for-the-log-test"
REPLICATE_TOKEN = "r8_replicate-token-for-the-log-test"
CLIENT_KEY = "client-key-for-the-log-test-0123456789"
CLEAN_EXIT = (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM it handled once shut down


@pytest.fixture(scope="module")
def fal() -> Iterator[tuple[FakeFal, LocalServer]]:
    fake = FakeFal(key=FAL_KEY)
    with LocalServer(fake.app) as srv:
        yield fake, srv


def config(tmp_path: Path, fal_url: str, **overrides: Any) -> Path:
    base: dict[str, Any] = {
        "log_level": "info",
        "models": {"fal-edit": {"routes": [{"provider": "fal", "model": FAL_MODEL}]}},
        "providers": {
            "fal": {
                "key": FAL_KEY,
                "queue_url": fal_url,
                "run_url": fal_url + "/sync",
                "rest_url": fal_url,
                "poll_interval": 0.02,
                "poll_max_interval": 0.05,
            },
            "replicate": {"api_token": REPLICATE_TOKEN},
        },
    }
    for key, val in overrides.items():
        base[key] = {**base[key], **val} if isinstance(val, dict) and isinstance(base.get(key), dict) else val
    return write_config(tmp_path / "imagegate.yaml", **base)


def edit_in_thread(url: str, results: dict[str, Any], **data: str) -> threading.Thread:
    def run() -> None:
        try:
            results["response"] = httpx.post(
                url + "/v1/images/edits",
                data={"model": "fal-edit", "prompt": "grayscale", "response_format": "b64_json", **data},
                files={"image": ("a.png", png_bytes(32, 32), "image/png")},
                timeout=60,
            )
        except httpx.HTTPError as exc:
            results["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def sigterm_during_a_job(
    tmp_path: Path,
    fal: tuple[FakeFal, LocalServer],
    scenario: FalScenario,
    grace: int,
    *,
    probe: bool = False,
    stream: bool = False,
) -> tuple[dict[str, Any], float]:
    """Start the gateway, send an edit, SIGTERM it once fal has the job; return the client's result
    and the seconds from SIGTERM to the process's exit. `probe`: check new connections are refused."""
    fake, srv = fal
    fake.reset()
    fake.scenario = scenario
    routing = {"keepalive_seconds": 0.2}  # a stream starts (200, keepalives) long before the SIGTERM
    gateway = GatewayProcess(tmp_path, config(tmp_path, srv.url, shutdown_grace_seconds=grace, routing=routing))
    results: dict[str, Any] = {}
    try:
        gateway.wait_ready()
        thread = edit_in_thread(gateway.url, results, **({"stream": "true"} if stream else {}))
        wait_until(lambda: fake.submits, timeout=20)
        started = time.monotonic()
        gateway.terminate()
        if probe:
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                httpx.get(gateway.url + "/healthz", timeout=2)
        assert gateway.wait(timeout=30) in CLEAN_EXIT
        elapsed = time.monotonic() - started
        thread.join(timeout=10)
    finally:
        gateway.stop()
    return results, elapsed


def test_sigterm_lets_an_in_flight_job_finish_within_the_grace(
    tmp_path: Path, fal: tuple[FakeFal, LocalServer]
) -> None:
    scenario = FalScenario(queue_polls=0, progress_polls=25)  # about a second of polling
    results, _ = sigterm_during_a_job(tmp_path, fal, scenario, grace=20, probe=True)
    response = results["response"]
    assert response.status_code == 200, response.text
    assert image_info(base64.b64decode(response.json()["data"][0]["b64_json"]))[0] == "PNG"
    fake, _ = fal
    assert fake.cancels == [] and len(fake.submits) == 1


def test_sigterm_cancels_a_job_still_running_after_the_grace(
    tmp_path: Path, fal: tuple[FakeFal, LocalServer]
) -> None:
    results, elapsed = sigterm_during_a_job(tmp_path, fal, FalScenario.hang(), grace=1)
    fake, _ = fal
    job = fake.submits[0]
    assert fake.cancels == [job.request_id] and job.cancelled  # cancelled upstream, not orphaned
    assert 1.0 <= elapsed < 15
    response = results["response"]  # answered, not dropped: a clean envelope the SDKs understand
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "server_shutting_down"
    assert response.headers["x-should-retry"] == "false"  # the job had started upstream


def test_sigterm_ends_a_stream_with_an_error_event_after_cancelling_upstream(
    tmp_path: Path, fal: tuple[FakeFal, LocalServer]
) -> None:
    results, _ = sigterm_during_a_job(tmp_path, fal, FalScenario.hang(), grace=1, stream=True)
    fake, _ = fal
    job = fake.submits[0]
    assert fake.cancels == [job.request_id] and job.cancelled
    response = results["response"]
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert ": keepalive" in response.text
    frames = [frame for frame in response.text.split("\n\n") if frame.startswith("event:")]
    assert len(frames) == 1 and frames[0].startswith("event: error\ndata: ")
    error = json.loads(frames[0].split("data: ", 1)[1])["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "server_error"


def test_metrics_aggregate_every_worker(tmp_path: Path, fal: tuple[FakeFal, LocalServer]) -> None:
    _, srv = fal
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"stale")  # from an earlier run: wiped at start
    gateway = GatewayProcess(
        tmp_path,
        config(tmp_path, srv.url, logging={"format": "json"}),
        workers=2,
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )
    sent = 0
    try:
        gateway.wait_ready(timeout=60)
        while sent < 200:
            with httpx.Client(timeout=30) as client:  # a new connection each time: any worker may take it
                response = client.post(
                    gateway.url + "/v1/images/generations",
                    json={"model": "sandbox-image", "prompt": "a lighthouse", "size": "64x64"},
                )
            assert response.status_code == 200, response.text
            sent += 1
            if sent >= 10 and len(list(metrics_dir.glob("counter_*.db"))) >= 2:
                break
        assert len(list(metrics_dir.glob("counter_*.db"))) == 2, "both workers served requests"
        for _ in range(4):  # whichever worker answers, it reports both workers' requests
            with httpx.Client(timeout=30) as client:
                samples = parse(client.get(gateway.url + "/metrics").text)
            labels = {"endpoint": "/v1/images/generations", "model": "sandbox-image", "key": "anonymous"}
            assert value(samples, "imagegate_requests_total", status="200", **labels) == sent
            assert value(samples, "imagegate_images_total", model="sandbox-image", provider="sandbox") == sent
            assert value(samples, "imagegate_in_flight_requests") == 1  # the scrape
    finally:
        gateway.stop()
    assert not (metrics_dir / "counter_1.db").exists()
    lines = [json.loads(line) for line in gateway.output().splitlines() if line.strip()]  # the supervisor's too
    messages = [line["message"] for line in lines]
    assert any("Started parent process" in m for m in messages)
    assert any("Idempotency-Key records and /v1/usage totals are kept per worker" in m for m in messages)
    assert sum(1 for line in lines if line["logger"] == "imagegate.requests" and line["status"] == 200) >= sent


def test_json_logs_carry_the_request_fields_and_no_secret(
    tmp_path: Path, fal: tuple[FakeFal, LocalServer]
) -> None:
    fake, srv = fal
    fake.reset()
    fake.scenario = FalScenario.instant()
    prompt = "grayscale and the-private-prompt-words"
    extra: dict[str, Any] = {}
    headers = {"x-request-id": "req-log-test-1"}
    key_name = "anonymous"
    if "auth" in Settings.model_fields:  # client keys, where this tree has them: the name is logged, never the key
        extra["auth"] = {"keys": [{"name": "team-log", "key": CLIENT_KEY}]}
        headers["authorization"] = f"Bearer {CLIENT_KEY}"
        key_name = "team-log"
    gateway = GatewayProcess(tmp_path, config(tmp_path, srv.url, logging={"format": "json"}, **extra))
    try:
        gateway.wait_ready()
        ok = httpx.post(
            gateway.url + "/v1/images/edits",
            data={"model": "fal-edit", "prompt": prompt, "response_format": "b64_json", "size": "48x48"},
            files={"image": ("a.png", png_bytes(32, 32), "image/png")},
            headers=headers,
            timeout=30,
        )
        assert ok.status_code == 200, ok.text
        bad = httpx.post(
            gateway.url + "/v1/images/generations",
            json={"model": "sandbox-image"},
            headers={**headers, "x-request-id": "req-log-test-2"},
            timeout=30,
        )
        assert bad.status_code == 400
    finally:
        gateway.stop()
    output = gateway.output()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is one object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    access = {line.get("request_id"): line for line in lines if line["logger"] == "imagegate.requests"}
    line = access["req-log-test-1"]
    assert line["level"] == "info" and line["status"] == 200 and line["key"] == key_name
    assert line["model"] == "fal-edit" and line["provider"] == "fal" and line["upstream_model"] == FAL_MODEL
    assert line["upstream_request_id"] == fake.submits[0].request_id
    assert set(line["duration_ms"]) == {"total", "upstream", "postprocess"}
    assert 0 < line["duration_ms"]["upstream"] <= line["duration_ms"]["total"]
    assert line["params"] == dict(p.split("=") for p in ok.headers["x-imagegate-params"].split("; "))
    assert line["images"] == 1 and "prompt" not in line
    assert [e["status"] for e in access.values() if e["path"] == "/v1/images/generations"] == [400]
    for secret in (FAL_KEY, "fal-key-secret-for-the-log-test", REPLICATE_TOKEN, CLIENT_KEY, "the-private-prompt-words"):
        assert secret not in output
    assert ok.json()["data"][0]["b64_json"][:40] not in output  # no image bytes


def test_workers_without_redis_refuse_per_key_limits(tmp_path: Path, fal: tuple[FakeFal, LocalServer]) -> None:
    _, srv = fal
    keys = {"keys": [{"name": "team-a", "key": CLIENT_KEY, "rpm": 5}]}
    result = subprocess.run(
        [sys.executable, "-m", "imagegate.cli", "serve", "--workers", "2", "--port", "1",
         "--config", str(config(tmp_path, srv.url, auth=keys))],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "ERROR:     imagegate: --workers 2 without redis.url" in result.stderr and "team-a" in result.stderr


def test_limits_hold_across_workers_on_redis(
    tmp_path: Path, fal: tuple[FakeFal, LocalServer], request: pytest.FixtureRequest
) -> None:
    _, srv = fal
    url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    metrics_dir = tmp_path / "prometheus"
    cfg = config(
        tmp_path,
        srv.url,
        auth={"keys": [{"name": "team-a", "key": CLIENT_KEY, "rpm": 4}]},
        redis={"url": url, "key_prefix": prefix},
    )
    gateway = GatewayProcess(tmp_path, cfg, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    statuses = []
    try:
        gateway.wait_ready(timeout=60)
        for _ in range(8):
            with httpx.Client(timeout=30) as client:  # a new connection each time: any worker may take it
                response = client.post(
                    gateway.url + "/v1/images/generations",
                    json={"model": "sandbox-image", "prompt": "a lighthouse", "size": "64x64"},
                    headers={"authorization": f"Bearer {CLIENT_KEY}"},
                )
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
        with httpx.Client(timeout=30) as client:
            samples = parse(client.get(gateway.url + "/metrics").text)
    finally:
        gateway.stop()
    assert statuses == [200] * 4 + [429] * 4  # one budget for both workers
    labels = {"endpoint": "/v1/images/generations", "model": "sandbox-image", "key": "team-a"}
    assert value(samples, "imagegate_requests_total", status="200", **labels) == 4
