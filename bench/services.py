"""The processes a benchmark run starts, each on a free 127.0.0.1 port, each stopped by the run:
the lean fake fal, `imagegate serve` (the real CLI, a config file pointing at the fake) and
LiteLLM's proxy (in the benchmark's own virtualenv, configured for fal image generation with
its API base at the fake's sync-run URL including the model path).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BENCH_VENV = Path(os.environ.get("BENCH_VENV") or ROOT / "bench" / ".venv")
LITELLM_VERSION = "1.100.5"
BENCH_REQUIREMENTS = [f"litellm[proxy]=={LITELLM_VERSION}", "matplotlib>=3.8"]

__all__ = ["BENCH_VENV", "Service", "ensure_bench_venv", "fake", "free_port", "imagegate", "litellm", "tree_cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and all its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += cpu.get(current, 0.0)
        todo.extend(children.get(current, []))
    return total


class Service:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.name, self.proc, self.url, self.log = name, proc, url, log

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def _started(
    name: str, cmd: list[str], health: str, workdir: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> Iterator[Service]:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    service = Service(name, proc, health.rsplit("/", 1)[0], log)
    try:
        _wait_http(health, proc, log, timeout)
        yield service
    finally:
        service.stop()


@contextlib.contextmanager
def fake(workdir: Path, *, model_time: float, image: str = "photo", name: str = "fake") -> Iterator[Service]:
    port = free_port()
    cmd = [
        PYTHON,
        str(ROOT / "bench" / "fake_upstream.py"),
        "--port",
        str(port),
        "--model-time",
        str(model_time),
        "--image",
        image,
    ]
    with _started(name, cmd, f"http://127.0.0.1:{port}/__stats", workdir) as service:
        yield service


def imagegate_config(
    fal_url: str,
    storage: Path,
    *,
    mode: str = "queue",
    poll: float = 0.005,
    poll_max: float = 0.05,
    url_mode: str = "passthrough",
    loop: str = "auto",
    http: str = "auto",
    status_stream: bool | None = None,
    status_stream_max: int | None = None,
    starts_per_tick: int | None = None,
) -> str:
    def _line(name: str, value: object) -> str:  # a fal setting; None: left to the gateway's default
        return "" if value is None else f"    {name}: {str(value).lower()}\n"

    return f"""
host: 127.0.0.1
log_level: warning
server: {{loop: {loop}, http: {http}{"" if starts_per_tick is None else f", starts_per_tick: {starts_per_tick}"}}}
storage: {{path: {storage}}}
delivery: {{url_mode: {url_mode}}}
routing: {{deadline_seconds: 120}}
providers:
  fal:
    key: test-fal-key
    queue_url: {fal_url}
    run_url: {fal_url}/sync
    rest_url: {fal_url}
    mode: {mode}
    poll_interval: {poll}
    poll_max_interval: {poll_max}
{_line("status_stream", status_stream)}{_line("status_stream_max", status_stream_max)}models:
  qwen-image:
    routes:
      - {{provider: fal, model: fal-ai/qwen-image}}
"""


@contextlib.contextmanager
def imagegate(
    workdir: Path, fal_url: str, *, workers: int = 1, name: str = "imagegate", **config: object
) -> Iterator[Service]:
    port = free_port()
    path = workdir / f"{name}.yaml"
    path.write_text(imagegate_config(fal_url, workdir / f"{name}-images", **config))  # type: ignore[arg-type]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGATE_", "FAL_", "REPLICATE_", "OPENAI_"))}
    cmd = [
        PYTHON,
        "-m",
        "imagegate.cli",
        "serve",
        "--config",
        str(path),
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    with _started(name, cmd, f"http://127.0.0.1:{port}/healthz", workdir, env=env) as service:
        yield service


def ensure_bench_venv() -> Path:
    """The benchmark's own virtualenv (LiteLLM's proxy, matplotlib): created on first use."""
    python = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / f".installed-{LITELLM_VERSION}"
    if not stamp.exists():
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *BENCH_REQUIREMENTS], check=True)
        stamp.touch()
    return python


@contextlib.contextmanager
def litellm(workdir: Path, fal_url: str, *, name: str = "litellm") -> Iterator[Service]:
    """LiteLLM's proxy: one model `qwen-image` -> fal_ai, api_base = the fake's sync-run URL + model path."""
    ensure_bench_venv()
    port = free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(f"""
model_list:
  - model_name: qwen-image
    litellm_params:
      model: fal_ai/fal-ai/qwen-image
      api_base: {fal_url}/sync/fal-ai/qwen-image
      api_key: test-fal-key
litellm_settings:
  telemetry: false
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "OPENAI_", "LITELLM_"))}
    env |= {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
        "DISABLE_SCHEMA_UPDATE": "true",
        "TMPDIR": tempfile.gettempdir(),
    }
    cmd = [
        str(BENCH_VENV / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    with _started(name, cmd, f"http://127.0.0.1:{port}/health/liveliness", workdir, env=env, timeout=120) as service:
        service.url = f"http://127.0.0.1:{port}"
        yield service
