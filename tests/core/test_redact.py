"""core/redact.py: configured secrets and credential shapes removed, markup stripped, length capped."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from urllib.parse import quote

import pytest
from tests.conftest import gateway_settings

from imagegate.app import create_app
from imagegate.core import redact
from imagegate.settings import Settings

SECRET = "tok-4f9d2c-unique-redact-test"


def test_configured_secrets_in_every_encoding_are_removed() -> None:
    redact.remember_secret(SECRET)
    for form in (SECRET, quote(SECRET, safe=""), json.dumps(SECRET)[1:-1], base64.b64encode(SECRET.encode()).decode()):
        assert SECRET not in redact.scrub(f"echo: {form} !")
        assert redact.REDACTED in redact.scrub(f"echo: {form} !")


def test_every_secret_str_in_the_settings_is_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTE_KEY_FOR_REDACT_TEST", "routekey-77aa-unique")
    settings = Settings(
        providers={"fal": {"key_id": "keyid-aa11-unique", "key_secret": "keysecret-bb22-unique"},
                   "replicate": {"api_token": "plain-token-cc33"}, "openai": {"api_key": "plainkey-dd44"}},
        models={"m": {"routes": [{"provider": "openai", "model": "x",
                                  "options": {"api_key_env": "ROUTE_KEY_FOR_REDACT_TEST"}}]}},
        redis={"url": "redis://:redispass-ee55@127.0.0.1:6379/0"},
    )
    redact.remember_secrets(settings)
    text = ("keyid-aa11-unique keysecret-bb22-unique plain-token-cc33 plainkey-dd44 routekey-77aa-unique "
            "redispass-ee55")
    assert redact.scrub(text) == " ".join([redact.REDACTED] * 6)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sent Authorization: Key 0123abcd-9876:ffee0011aabb", "sent Authorization: Key [redacted]"),
        ("header Bearer eyJhbGciOi.JIUzI1NiJ9.abc", "header Bearer [redacted]"),
        ("Basic dXNlcjpwYXNzd29yZA==", "Basic [redacted]"),
        ("token r8_AbCdEf123456 leaked", "token [redacted] leaked"),
        ("key sk-proj-abcdef123456", "key [redacted]"),
        ("0d4c3b2a-1f2e-4d3c-8b7a-6f5e4d3c2b1a:00112233445566778899aabbccddeeff", "[redacted]"),
        ('{"authorization": "Key whatever-1234"}', '{"authorization": "Key [redacted]"}'),
        ('{"authorization": "abcdef123456"}', '{"authorization": "[redacted]"}'),
        ("x-api-key=abc12345def&y=2", "x-api-key=[redacted]&y=2"),
        ("Token limit reached; key error in field", "Token limit reached; key error in field"),
        ("Incorrect API key provided.", "Incorrect API key provided."),
        ("Invalid value for 'api_key': must be a string", "Invalid value for 'api_key': must be a string"),
    ],
)
def test_credential_shapes(text: str, expected: str) -> None:
    # Another test may have configured a shape as a secret: its halves are then masked one by one.
    assert redact.scrub(text) in (expected, expected.replace(redact.REDACTED, f"{redact.REDACTED}:{redact.REDACTED}"))


def test_a_full_stop_after_prose_is_not_a_token() -> None:
    assert redact.scrub("Incorrect API key provided.") == "Incorrect API key provided."


def test_upstream_text_strips_markup_internals_and_caps() -> None:
    page = "<html><head><title>502 Bad Gateway</title><style>x{}</style></head><body><h1>Bad</h1></body></html>"
    assert redact.upstream_text(page) == "502 Bad Gateway"
    assert redact.upstream_text("<html><body><p>a &amp; b</p><script>evil()</script></body></html>") == "a & b"
    assert redact.upstream_text("cannot identify image file <_io.BytesIO object at 0x7f3a2c>") == (
        "cannot identify image file"
    )
    assert redact.upstream_text("line\r\nx-evil: 1\x00") == "line x-evil: 1"
    long = redact.upstream_text("word " * 500, limit=50)
    assert len(long) == 50 and long.endswith("…")
    assert redact.upstream_text(None) == "" and redact.upstream_text(42) == ""


def test_upstream_token() -> None:
    assert redact.upstream_token("image_size") == "image_size"
    assert redact.upstream_token("a b") is None and redact.upstream_token("x" * 65) is None
    assert redact.upstream_token("r8_AbCdEf123456") is None
    assert redact.upstream_token(None) is None


def test_log_filter_scrubs_messages_arguments_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    redact.remember_secret(SECRET)
    logger = logging.getLogger("imagegate.test_redact_child")
    redact.install_log_filter()
    caplog.set_level(logging.DEBUG)
    logger.warning("upstream said %s", f"Bearer {SECRET}")
    try:
        raise ValueError(f"boom {SECRET}")
    except ValueError:
        logger.exception("failed")
    assert SECRET not in caplog.text and "[redacted]" in caplog.text
    assert all(SECRET not in record.getMessage() for record in caplog.records)


def test_the_app_filters_every_imagegate_logger(tmp_path: Path) -> None:
    create_app(gateway_settings(tmp_path))
    names = [name for name in logging.root.manager.loggerDict if name == "imagegate" or name.startswith("imagegate.")]
    assert len(names) > 10
    assert all(redact._FILTER in logging.getLogger(name).filters for name in names)
