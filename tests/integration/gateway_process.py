"""`imagegate serve` (or another `imagegate` command) as a real process on 127.0.0.1, configured by a
YAML file built from the packaged defaults plus overrides: for shutdown, worker, log, backpressure and
RSS tests that need the CLI's own startup."""

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

__all__ = ["CliProcess", "GatewayProcess", "clean_env", "free_port", "rss_bytes", "write_config"]

_SECRET_ENV = ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "REPLICATE_API_TOKEN", "OPENAI_API_KEY")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without provider keys or IMAGEGATE_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV and not k.startswith("IMAGEGATE_")}
    env.update(extra)
    return env


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_config(path: Path, **overrides: Any) -> Path:
    """The packaged default config with `overrides` merged in (storage under path's directory)."""
    text = resources.files("imagegate").joinpath("defaults", "imagegate.yaml").read_text("utf-8")
    data = _merge(yaml.safe_load(text), {"storage": {"path": str(path.parent / "images")}})
    path.write_text(yaml.safe_dump(_merge(data, overrides)), encoding="utf-8")
    return path


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class CliProcess:
    """`python -m imagegate.cli <args>` with stdout and stderr in one file (a file, not a pipe: a full
    pipe would block the process), `IMAGEGATE_DATA_DIR` under `tmp_path` and a clean environment."""

    def __init__(
        self, tmp_path: Path, args: list[str], log_name: str, *, env: dict[str, str] | None = None, data: str = "data"
    ) -> None:
        self.log_path = tmp_path / f"{log_name}.log"
        environ = clean_env(IMAGEGATE_DATA_DIR=str(tmp_path / data), PYTHONUNBUFFERED="1", **(env or {}))
        self._log = self.log_path.open("wb")
        argv = [sys.executable, "-m", "imagegate.cli", *args]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=environ)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text("utf-8", errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 20 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class GatewayProcess(CliProcess):
    """`imagegate serve --config <file> --port <free port>`; as a context manager it waits until
    `/healthz` answers and stops the server on exit."""

    def __init__(self, tmp_path: Path, config: Path, *, workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["serve", "--config", str(config), "--port", str(self.port)]
        if workers > 1:
            args += ["--workers", str(workers)]
        super().__init__(tmp_path, args, f"gateway-{self.port}", env=env)

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

    def __enter__(self) -> GatewayProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
