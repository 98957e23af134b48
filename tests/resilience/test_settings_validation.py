"""Settings that cannot work stop the real CLI (a subprocess) with one line naming the setting and
its allowed range, exit status 2 and no traceback; misspelt IMAGEGATE_* variables are warned about
with the closest known name; `imagegate config check` prints the configuration, secrets masked."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.integration.gateway_process import clean_env, write_config

from imagegate.config_check import check_config, env_setting_names, unknown_env_warnings

GT0_INT = "must be an integer greater than 0"
GT0_NUM = "must be a number greater than 0"
HTTP_URL = "must be an http(s) URL such as https://example.com"

# (environment variable, value, setting, the allowed range in the message)
ENV_CASES = [
    ("STORAGE__TTL_SECONDS", "0", "storage.ttl_seconds", GT0_INT),
    ("STORAGE__TTL_SECONDS", "-60", "storage.ttl_seconds", GT0_INT),
    ("LIMITS__MAX_BODY_BYTES", "-1", "limits.max_body_bytes", GT0_INT),
    ("LIMITS__MAX_IMAGE_BYTES", "0", "limits.max_image_bytes", GT0_INT),
    ("LIMITS__MAX_MASK_BYTES", "0", "limits.max_mask_bytes", GT0_INT),
    ("LIMITS__MAX_PIXELS", "0", "limits.max_pixels", GT0_INT),
    ("LIMITS__MAX_PIXELS", "lots", "limits.max_pixels", GT0_INT),
    ("LIMITS__MAX_IMAGES", "0", "limits.max_images", "must be an integer from 1 to 1000"),
    ("LIMITS__MAX_PROMPT_CHARS", "0", "limits.max_prompt_chars", GT0_INT),
    ("LIMITS__MAX_INFLIGHT_REQUESTS", "0", "limits.max_inflight_requests", GT0_INT),
    ("LIMITS__MAX_INFLIGHT_BYTES", "0", "limits.max_inflight_bytes", GT0_INT),
    ("LIMITS__MAX_QUEUED", "-1", "limits.max_queued", "must be an integer of at least 0"),
    ("LIMITS__QUEUE_TIMEOUT_SECONDS", "-1", "limits.queue_timeout_seconds", "must be a number of at least 0"),
    ("LIMITS__BUSY_RETRY_AFTER_SECONDS", "inf", "limits.busy_retry_after_seconds", "must be a number of at least 0"),
    ("LIMITS__TRIM_AFTER_BYTES", "-1", "limits.trim_after_bytes", "must be an integer of at least 0"),
    ("ROUTING__DEADLINE_SECONDS", "0", "routing.deadline_seconds", GT0_NUM),
    ("ROUTING__DEADLINE_SECONDS", "nan", "routing.deadline_seconds", GT0_NUM),
    ("ROUTING__MAX_ATTEMPTS", "0", "routing.max_attempts", GT0_INT),
    ("ROUTING__BACKOFF_BASE", "-0.5", "routing.backoff_base", "must be a number of at least 0"),
    ("ROUTING__BACKOFF_MAX", "-1", "routing.backoff_max", "must be a number of at least 0"),
    ("ROUTING__FANOUT_CONCURRENCY", "0", "routing.fanout_concurrency", GT0_INT),
    ("ROUTING__KEEPALIVE_SECONDS", "0", "routing.keepalive_seconds", GT0_NUM),
    ("FETCH__MAX_BYTES", "0", "fetch.max_bytes", GT0_INT),
    ("FETCH__TIMEOUT_SECONDS", "-1", "fetch.timeout_seconds", GT0_NUM),
    ("PROVIDERS__FAL__QUEUE_URL", "ftp://queue.fal.run", "providers.fal.queue_url", HTTP_URL),
    ("PROVIDERS__FAL__RUN_URL", "fal.run", "providers.fal.run_url", HTTP_URL),
    ("PROVIDERS__FAL__REST_URL", "https://", "providers.fal.rest_url", HTTP_URL),
    ("PROVIDERS__FAL__MODE", "fast", "providers.fal.mode", "must be 'queue' or 'sync'"),
    ("PROVIDERS__FAL__POLL_INTERVAL", "0", "providers.fal.poll_interval", GT0_NUM),
    ("PROVIDERS__FAL__POLL_MAX_INTERVAL", "-3", "providers.fal.poll_max_interval", GT0_NUM),
    ("PROVIDERS__FAL__INLINE_MAX_BYTES", "-1", "providers.fal.inline_max_bytes", "must be an integer of at least 0"),
    ("PROVIDERS__REPLICATE__BASE_URL", "file:///etc/passwd", "providers.replicate.base_url", HTTP_URL),
    ("PROVIDERS__REPLICATE__WAIT_SECONDS", "61", "providers.replicate.wait_seconds", "must be an integer from 1 to 60"),
    ("PROVIDERS__REPLICATE__POLL_INTERVAL", "0", "providers.replicate.poll_interval", GT0_NUM),
    ("PROVIDERS__OPENAI__BASE_URL", "https://[::1/v1", "providers.openai.base_url", HTTP_URL),
    ("PROVIDERS__SANDBOX__DELAY_SECONDS", "-1", "providers.sandbox.delay_seconds", "must be a number of at least 0"),
    ("DELIVERY__PUBLIC_BASE_URL", "images.example.com", "delivery.public_base_url", HTTP_URL),
    ("DELIVERY__URL_MODE", "copy", "delivery.url_mode", "must be 'rehost' or 'passthrough'"),
    ("PORT", "70000", "port", "must be an integer from 0 to 65535"),
    ("WORKERS", "0", "workers", GT0_INT),
    ("IMAGE_WORKERS", "0", "image_workers", GT0_INT),
    ("LOG_LEVEL", "loud", "log_level", "must be 'critical', 'error', 'warning', 'info', 'debug' or 'trace'"),
]

ROUTE = {"provider": "sandbox", "model": "sandbox-edit"}
# (config overrides, the expected line after "imagegate: ")
FILE_CASES: list[tuple[dict[str, Any], str]] = [
    ({"storage": {"ttl_seconds": 0}}, "invalid setting 'storage.ttl_seconds' = 0 in {path}: " + GT0_INT),
    ({"limits": {"max_pixel": 5}}, "unknown setting 'limits.max_pixel' in {path} (did you mean 'limits.max_pixels'?)"),
    ({"limit": {}}, "unknown setting 'limit' in {path} (did you mean 'limits'?)"),
    (
        {"models": {"x": {"routes": [{**ROUTE, "timeout_second": 5}]}}},
        "unknown setting 'models.x.routes[0].timeout_second' in {path} "
        "(did you mean 'models.x.routes[0].timeout_seconds'?)",
    ),
    (
        {"models": {"x": {"routes": [{**ROUTE, "timeout_seconds": 0}]}}},
        "invalid setting 'models.x.routes[0].timeout_seconds' = 0 in {path}: " + GT0_NUM,
    ),
    (
        {"models": {"x": {"routes": [{"provider": "fall", "model": "m"}]}}},
        "invalid setting 'models.x.routes[0].provider' = 'fall' in {path}: "
        "must be one of fal, openai, replicate, sandbox",
    ),
    ({"models": {"x": {"routes": []}}}, "invalid setting 'models.x.routes' = [] in {path}: must be a non-empty list"),
    ({"limits": 5}, "invalid setting 'limits' = 5 in {path}: must be a mapping of settings"),
    (
        {"fetch": {"allow_hosts": "example.com"}},
        "invalid setting 'fetch.allow_hosts' = 'example.com' in {path}: must be a list",
    ),
    (
        {"storage": {"backend": "s3"}},
        "invalid setting 'storage' in {path}: storage.backend is s3 but storage.s3.bucket is empty",
    ),
    (
        {"delivery": {"public_base_url": "ftp://images.example.com"}},
        "invalid setting 'delivery.public_base_url' = 'ftp://images.example.com' in {path}: " + HTTP_URL,
    ),
]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagegate.cli", *args],
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def _assert_one_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"imagegate: {expected}"]


# Through the real CLI in a subprocess: every setting the README's validation list names, and one
# case of every kind of check. All ENV_CASES also go through the same check in-process (below).
CLI_ENV_CASES = [c for c in ENV_CASES if c[2] in {
    "storage.ttl_seconds", "limits.max_body_bytes", "routing.deadline_seconds", "limits.max_pixels",
    "limits.max_images", "providers.fal.queue_url", "providers.replicate.base_url", "providers.openai.base_url",
    "delivery.public_base_url", "providers.fal.mode", "limits.max_queued", "port", "image_workers",
}]  # fmt: skip


def _env_line(name: str, value: str, setting: str, allowed: str) -> str:
    return f"invalid setting '{setting}' = {value!r} from $IMAGEGATE_{name}: {allowed}"


def test_invalid_environment_settings_stop_serve_with_one_line() -> None:
    def run(case: tuple[str, str, str, str]) -> subprocess.CompletedProcess[str]:
        name, value, _, _ = case
        return _cli("serve", "--port", "1", env=clean_env(**{f"IMAGEGATE_{name}": value}))

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, CLI_ENV_CASES))
    for case, result in zip(CLI_ENV_CASES, results, strict=True):
        _assert_one_line(result, _env_line(*case))


@pytest.mark.parametrize(("name", "value", "setting", "allowed"), ENV_CASES)
def test_every_invalid_environment_setting_is_one_error(
    name: str, value: str, setting: str, allowed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in list(os.environ):
        if var.startswith("IMAGEGATE_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv(f"IMAGEGATE_{name}", value)
    check = check_config(None)
    assert check.settings is None and not check.ok
    assert check.errors == [_env_line(name, value, setting, allowed)]


def test_every_invalid_file_setting_stops_serve(tmp_path: Path) -> None:
    def run(index: int) -> tuple[Path, subprocess.CompletedProcess[str]]:
        path = write_config(tmp_path / f"config-{index}.yaml", **FILE_CASES[index][0])
        return path, _cli("serve", "--config", str(path), "--port", "1")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(len(FILE_CASES))))
    for (_, expected), (path, serve) in zip(FILE_CASES, results, strict=True):
        _assert_one_line(serve, expected.format(path=path))
    path = results[0][0]
    _assert_one_line(_cli("config", "check", "--config", str(path)), FILE_CASES[0][1].format(path=path))


def test_an_unreadable_config_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    _assert_one_line(
        _cli("serve", "--config", str(missing)), f"cannot read the config file {missing}: No such file or directory"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("limits: [unclosed\n")
    result = _cli("config", "check", "--config", str(broken))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"imagegate: cannot read the config file {broken}: ")


def test_config_check_prints_the_effective_configuration_with_secrets_masked(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "config.yaml",
        providers={"openai": {"base_url": "https://proxy-user:proxy-pass@proxy.example.com/v1"}},
        routing={"deadline_seconds": 42},
    )
    env = clean_env(
        FAL_KEY="fal-secret-key-123", REPLICATE_API_TOKEN="r8_secret_token", IMAGEGATE_LIMITS__MAX_IMAGES="8"
    )
    result = _cli("config", "check", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for secret in ("fal-secret-key-123", "r8_secret_token", "proxy-pass"):
        assert secret not in result.stdout
    shown = yaml.safe_load(result.stdout)
    assert shown["providers"]["fal"]["key"] == "**********"
    assert shown["providers"]["replicate"]["api_token"] == "**********"
    assert shown["providers"]["openai"]["api_key"] is None
    assert shown["providers"]["openai"]["base_url"] == "https://proxy-user:****@proxy.example.com/v1"
    assert shown["routing"]["deadline_seconds"] == 42
    assert shown["limits"]["max_images"] == 8  # the environment wins over the file
    [route] = shown["models"]["sandbox-edit"]["routes"]
    assert (route["provider"], route["model"], route["timeout_seconds"]) == ("sandbox", "sandbox-edit", None)


def test_a_misspelt_environment_variable_is_a_warning_naming_the_closest_setting() -> None:
    env = clean_env(IMAGEGATE_LIMITS__MAX_PIXEL="5", IMAGEGATE_STORAGE__TTL="60", IMAGEGATE_ZZZ_QQQ="1")
    result = _cli("config", "check", env=env)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        "imagegate: warning: unknown environment variable IMAGEGATE_LIMITS__MAX_PIXEL is ignored: "
        "did you mean IMAGEGATE_LIMITS__MAX_PIXELS?",
        "imagegate: warning: unknown environment variable IMAGEGATE_STORAGE__TTL is ignored: "
        "did you mean IMAGEGATE_STORAGE__TTL_SECONDS?",
        "imagegate: warning: unknown environment variable IMAGEGATE_ZZZ_QQQ is ignored: it names no setting",
    ]
    assert yaml.safe_load(result.stdout)["limits"]["max_pixels"] == 40_000_000


def test_known_names_variables_read_by_the_file_and_model_routes_are_not_warned_about() -> None:
    names, open_prefixes = env_setting_names()
    assert {"IMAGEGATE_LIMITS", "IMAGEGATE_LIMITS__MAX_PIXELS", "IMAGEGATE_PROVIDERS__FAL__QUEUE_URL"} <= names
    assert "IMAGEGATE_MODELS__" in open_prefixes
    environ = {
        "IMAGEGATE_CONFIG": "x.yaml",
        "IMAGEGATE_DATA_DIR": "/data",
        "IMAGEGATE_REDIS_URL": "redis://",  # read by the file as ${IMAGEGATE_REDIS_URL}
        "imagegate_limits__max_images": "4",  # names are case-insensitive
        "IMAGEGATE_MODELS__X__ROUTES": "[]",
        "PATH": "/bin",
    }
    assert unknown_env_warnings(environ, referenced={"IMAGEGATE_REDIS_URL"}) == []


@pytest.mark.parametrize(
    "value", ["http://127.0.0.1:8080", "https://images.example.com/base", "HTTPS://Example.com", "http://[::1]:9/"]
)
def test_valid_urls_are_accepted(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGATE_DELIVERY__PUBLIC_BASE_URL", value)
    check = check_config(None)
    assert check.errors == [], check.errors
    assert check.settings is not None and check.settings.delivery.public_base_url == value
