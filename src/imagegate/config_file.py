"""The config file: YAML with `${NAME}` / `${NAME:-default}` read from the environment, and the
deep merge that lays the environment and overrides over it (validated by `settings.Settings`)."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_CONFIG", "deep_merge", "interpolate_env", "read_yaml"]

DEFAULT_CONFIG = "imagegate.yaml"  # packaged under imagegate/defaults/ (configs/imagegate.yaml links to it)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate_env(value: Any, environ: dict[str, str] | None = None) -> Any:
    """Replace `${NAME}` / `${NAME:-default}` in every string of a YAML document."""
    env = os.environ if environ is None else environ
    if isinstance(value, str):
        return _ENV_REF.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate_env(v, environ) for v in value]
    if isinstance(value, dict):
        return {k: interpolate_env(v, environ) for k, v in value.items()}
    return value


def read_yaml(path: Path | None) -> dict[str, Any]:
    if path is None:
        text = resources.files("imagegate").joinpath("defaults", DEFAULT_CONFIG).read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping")
    return interpolate_env(data)  # type: ignore[no-any-return]


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
