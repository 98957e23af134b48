"""The real `imagegate serve` in a subprocess on 127.0.0.1, configured by a YAML file built from the
packaged defaults plus overrides: for tests that need the CLI's own startup or the server's RSS."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import yaml

__all__ = ["GatewayProcess", "clean_env", "rss_bytes", "write_config"]

_SECRET_ENV = ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "REPLICATE_API_TOKEN", "OPENAI_API_KEY")


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatewayProcess:
    """`python -m imagegate.cli serve --config <file> --port <free port>` until the context exits."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None, startup_timeout: float = 30.0) -> None:
        self.config = config
        self.env = env if env is not None else clean_env()
        self.startup_timeout = startup_timeout
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.with_suffix(".stderr.log")

    def stderr(self) -> str:
        return self.log.read_text("utf-8", errors="replace") if self.log.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> GatewayProcess:
        cmd = [sys.executable, "-m", "imagegate.cli", "serve", "--config", str(self.config), "--port", str(self.port)]
        with self.log.open("wb") as log:  # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}: {self.stderr()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError("the gateway did not start in time")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
