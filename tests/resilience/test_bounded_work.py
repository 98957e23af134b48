"""Bounded work per request: every image the gateway makes stays within `limits.max_pixels`, a
prompt runs at most `providers.sandbox.max_operations` operations, a cancelled job stops consuming
CPU at its next operation boundary, and a MemoryError in image work is a clean 503.

The amplification and cancellation tests run the gateway as its own process (uvicorn on a
127.0.0.1 port it binds itself), so that its peak RSS (`VmHWM`) and CPU time are its own.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from PIL import Image
from tests.conftest import gateway_settings
from tests.fakes.images import png_bytes
from tests.fakes.server import LocalServer

from imagegate.app import create_app
from imagegate.core import imaging
from imagegate.providers.sandbox import ops
from imagegate.settings import DEFAULT_CONFIG

_LAUNCHER = """
import socket, sys, uvicorn
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
config = uvicorn.Config("imagegate.app:app_from_env", factory=True, log_level="warning", lifespan="on")
uvicorn.Server(config).run(sockets=[sock])
"""
MiB = 1024 * 1024


class GatewayProcess:
    """`imagegate.app:app_from_env` under uvicorn in a child process; reads its RSS and CPU time."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        # The packaged defaults (its models included), storage in tmp_path, no keys, then `overrides`.
        config = yaml.safe_load(resources.files("imagegate").joinpath("defaults", DEFAULT_CONFIG).read_text())
        config.update(storage={"path": str(tmp_path / "images")}, log_level="warning")
        config["providers"] = {"fal": {"key": ""}, "replicate": {"api_token": ""}, "openai": {"api_key": ""}}
        config.update(overrides)
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGATE_", "FAL_", "REPLICATE_"))}
        env["IMAGEGATE_CONFIG"] = str(path)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, "the gateway did not start"
            time.sleep(0.05)

    def _status(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    def peak_rss(self) -> int:
        return self._status("VmHWM")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path_factory.mktemp("bounded"), routing={"deadline_seconds": 3})
    try:
        yield process
    finally:
        process.stop()


def _edit(url: str, prompt: str, *images: bytes, timeout: float = 30, **fields: str) -> httpx.Response:
    files = [("image[]", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(
        url + "/v1/images/edits",
        data={"model": "sandbox-edit", "prompt": prompt, "response_format": "b64_json", **fields},
        files=files,
        timeout=timeout,
    )


def _error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


# -- amplification: answered 400 in under a second, with bounded memory -----------------------


AMPLIFIERS = [  # (id, prompt, input sizes, blamed param, code)
    ("16-expanding-rotations", "rotate 45 " * 16, [(64, 64)], "prompt", "image_too_large"),
    ("15-rotations-by-30", "rotate 30 " * 15, [(64, 64)], "prompt", "image_too_large"),
    ("17-operations", "invert " * 17, [(8, 8)], "prompt", "too_many_operations"),
    ("tall-beside-wide", "mirror", [(40, 40_000), (40_000, 40)], "image", "image_too_large"),
]


def test_amplifying_edits_are_refused_fast_with_bounded_memory(gateway: GatewayProcess) -> None:
    assert _edit(gateway.url, "invert", png_bytes(64, 64)).status_code == 200  # warm: imports, first encode
    baseline = gateway.peak_rss()
    for name, prompt, sizes, blamed, code in AMPLIFIERS:
        images = [png_bytes(w, h) for w, h in sizes]
        started = time.monotonic()
        response = _edit(gateway.url, prompt, *images)
        elapsed = time.monotonic() - started
        assert response.status_code == 400, (name, response.text)
        assert _error(response)["param"] == blamed and _error(response)["code"] == code, name
        assert _error(response)["type"] == "invalid_request_error"
        assert elapsed < 1.0, (name, elapsed)
    grown = gateway.peak_rss() - baseline
    assert grown < 200 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB"
    # ...and the gateway still works.
    ok = _edit(gateway.url, "rotate 45", png_bytes(64, 64))
    assert ok.status_code == 200
    out = Image.open(io.BytesIO(base64.b64decode(ok.json()["data"][0]["b64_json"])))
    assert out.size == Image.new("RGB", (64, 64)).rotate(45, expand=True).size


def test_a_composite_of_inputs_each_within_budget_is_refused(gateway: GatewayProcess) -> None:
    response = _edit(gateway.url, "mirror", *[png_bytes(3700, 3700)] * 3)  # 3 x 13.7 Mpx > 40 Mpx
    assert response.status_code == 400
    assert (_error(response)["param"], _error(response)["code"]) == ("image", "image_too_large")
    assert "3700x3700" not in _error(response)["message"] and "11100x3700" in _error(response)["message"]


def test_within_budget_rotations_still_run(gateway: GatewayProcess) -> None:
    response = _edit(gateway.url, "rotate 45 " * 4, png_bytes(64, 64), size="256x256")
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "256x256"


def test_an_oversized_size_is_refused_before_any_work(gateway: GatewayProcess) -> None:
    response = _edit(gateway.url, "invert", png_bytes(8, 8), size="14000x14000")
    assert response.status_code == 400 and _error(response)["param"] == "size"


# -- cancellation: a job whose client left or whose deadline passed stops using CPU ----------------


def _cpu_in(gateway: GatewayProcess, start: float, end: float) -> float:
    """CPU seconds the gateway used between `start` and `end` seconds from now."""
    time.sleep(start)
    before = gateway.cpu_seconds()
    time.sleep(end - start)
    return gateway.cpu_seconds() - before


HEAVY_SIZE = (4000, 4000)  # 16 Mpx, a few kB of PNG; 16 filters over it take many seconds
HEAVY_PROMPT = "sharpen blur " * 8


def test_a_job_whose_client_went_away_stops_consuming_cpu(gateway: GatewayProcess) -> None:
    heavy = png_bytes(*HEAVY_SIZE)
    with pytest.raises(httpx.ReadTimeout):
        _edit(gateway.url, HEAVY_PROMPT, heavy, timeout=1.2)  # the client gives up and closes
    # Without cancellation a worker stays busy for seconds (~1 CPU second per second).
    used = _cpu_in(gateway, 1.5, 3.5)
    assert used < 0.3, f"the gateway used {used:.2f} CPU s after the client left"


def test_a_job_past_its_deadline_stops_consuming_cpu(gateway: GatewayProcess) -> None:
    heavy = png_bytes(*HEAVY_SIZE)
    started = time.monotonic()
    response = _edit(gateway.url, HEAVY_PROMPT, heavy)
    assert response.status_code == 504 and _error(response)["code"] == "upstream_timeout"
    assert time.monotonic() - started < 4.5  # deadline_seconds=3
    used = _cpu_in(gateway, 1.5, 3.5)
    assert used < 0.3, f"the gateway used {used:.2f} CPU s after the deadline"


# -- the pool job itself ----------------------------------------------------------------------


async def test_a_cancelled_pool_job_stops_at_its_next_checkpoint() -> None:
    pool = imaging.ImagePool(1)
    steps: list[int] = []
    stopped = threading.Event()

    def job() -> None:
        try:
            for i in range(500):
                imaging.checkpoint()
                steps.append(i)
                time.sleep(0.01)
        except imaging.Cancelled:
            stopped.set()
            raise

    task = asyncio.ensure_future(pool.run(job))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(stopped.wait, 2)
    assert len(steps) < 30
    assert await pool.run(lambda: 42) == 42  # the worker is free again
    pool.close()


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [(MemoryError, 503, "insufficient_resources"), (RuntimeError("boom at 0x7f00deadbeef"), 500, "internal_error")],
    ids=["memory-error", "unexpected-error"],
)
def test_a_failure_in_image_work_is_a_clean_error_and_the_pool_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException, status: int, code: str
) -> None:
    real_edit = ops.edit
    calls = 0

    def failing_once(*args: Any, **kwargs: Any) -> Image.Image:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise failure
        return real_edit(*args, **kwargs)

    monkeypatch.setattr(ops, "edit", failing_once)
    app = create_app(gateway_settings(tmp_path, image_workers=1))
    with LocalServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.images.edit(model="sandbox-edit", image=("a.png", png_bytes(16, 16)), prompt="invert")
        assert info.value.status_code == status
        body = info.value.response.json()["error"]
        assert body["code"] == code and body["type"] == "server_error" and body["param"] is None
        assert "Error" not in body["message"] and "0x" not in body["message"]  # no Python internals
        if status == 503:
            assert info.value.response.headers.get("retry-after") == "1"
        result = client.images.edit(  # the single worker is free again
            model="sandbox-edit", image=("a.png", png_bytes(16, 16)), prompt="invert", response_format="b64_json"
        )
        assert result.data and result.data[0].b64_json
        client.close()


def test_a_gif_frame_larger_than_its_screen_counts_at_its_real_size() -> None:
    frame = io.BytesIO()
    Image.new("P", (2000, 2000), 0).save(frame, "GIF")
    data = bytearray(frame.getvalue())
    data[6:10] = (8).to_bytes(2, "little") * 2  # the logical screen claims 8x8
    with pytest.raises(imaging.TooManyPixels, match="2000x2000"):
        imaging.probe(bytes(data), max_pixels=1_000_000)


# -- every image operation checks the budget before it allocates -------------------------------


def test_plan_edit_blames_the_right_parameter() -> None:
    with pytest.raises(ops.EditRefused) as info:
        ops.plan_edit([(64, 64)], "rotate 45 " * 16, max_pixels=40_000_000)
    assert info.value.param == "prompt" and "step 14" in str(info.value)
    with pytest.raises(ops.EditRefused) as info:
        ops.plan_edit([(1000, 40_000), (40_000, 1000)], "mirror", max_pixels=40_000_000)
    assert info.value.param == "image"
    with pytest.raises(ops.EditRefused) as info:
        ops.plan_edit([(8, 8)], "invert " * 5, max_operations=4)
    assert info.value.param == "prompt" and info.value.code == "too_many_operations"
    assert [op.name for op in ops.plan_edit([(8, 8)], "invert " * 4, max_operations=4)] == ["invert"] * 4


@pytest.mark.parametrize("degrees", [1, 13, 30, 45, 60, 90, 135, 180, 200, 270, 333, -45])
def test_predicted_rotation_size_bounds_pillows(degrees: int) -> None:
    img = Image.new("RGB", (37, 23))
    predicted = ops.Operation("rotate", degrees).output_size(img.size)
    actual = img.rotate(degrees, expand=True).size
    assert actual[0] <= predicted[0] <= actual[0] + 2 and actual[1] <= predicted[1] <= actual[1] + 2


def test_transform_checks_its_resize_target() -> None:
    with pytest.raises(imaging.TooManyPixels, match="the output"):
        imaging.transform(png_bytes(8, 8), size=(5000, 5000), fmt="png", compression=None, background=None,
                          max_pixels=1_000_000)  # fmt: skip


def test_generate_checks_its_size() -> None:
    with pytest.raises(imaging.TooManyPixels):
        ops.generate("x", seed=1, size=(2000, 2000), max_pixels=1_000_000)
