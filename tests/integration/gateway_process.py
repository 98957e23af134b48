"""`imagegate serve` as a real process on 127.0.0.1, for shutdown, worker and log tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import yaml

_PROVIDER_ENV = ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "REPLICATE_API_TOKEN", "OPENAI_API_KEY")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, **overrides: Any) -> Path:
    """The packaged default config with `overrides` merged in, as a YAML file."""
    text = resources.files("imagegate").joinpath("defaults", "imagegate.yaml").read_text("utf-8")
    config = _merge(yaml.safe_load(text), overrides)
    path.write_text(yaml.safe_dump(config), "utf-8")
    return path


class GatewayProcess:
    """`python -m imagegate.cli serve --config ... --port ...`, stderr captured in a file."""

    def __init__(self, tmp_path: Path, config: Path, *, workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"gateway-{self.port}.log"
        environ = {k: v for k, v in os.environ.items() if k not in _PROVIDER_ENV}
        environ.update({"IMAGEGATE_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1", **(env or {})})
        argv = [sys.executable, "-m", "imagegate.cli", "serve", "--config", str(config), "--port", str(self.port)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=environ)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"imagegate serve exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"imagegate serve did not start:\n{self.output()}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text("utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
