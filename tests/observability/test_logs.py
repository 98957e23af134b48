"""The request log line: fields, prompts only when asked, secrets redacted by the formatters."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
from tests.conftest import gateway_settings
from tests.fakes.images import png_bytes

from imagegate.app import create_app
from imagegate.observability.logs import FIELDS_ATTR, REDACTED, JsonFormatter, TextFormatter, secrets_of

PROMPT = "grayscale with the-words-of-the-prompt"


async def access_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture, **logging_settings: object) -> list[dict]:
    app = create_app(gateway_settings(tmp_path, logging=logging_settings))
    caplog.set_level(logging.INFO, logger="imagegate.access")
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://g") as client:
        response = await client.post(
            "/v1/images/edits",
            data={"model": "sandbox-edit", "prompt": PROMPT, "response_format": "b64_json"},
            files={"image": ("a.png", png_bytes(20, 20), "image/png")},
            headers={"x-request-id": "req-logs-1"},
        )
        assert response.status_code == 200
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == "imagegate.access"]


async def test_prompts_stay_out_of_the_log_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (line,) = await access_lines(tmp_path, caplog)
    assert "prompt" not in line and PROMPT not in json.dumps(line)
    assert line["status"] == 200 and line["model"] == "sandbox-edit" and line["provider"] == "sandbox"
    assert line["operation"] == "edit" and line["images"] == 1 and line["key"] == "anonymous"
    assert line["duration_ms"]["total"] >= line["duration_ms"]["upstream"] > 0
    assert line["duration_ms"]["postprocess"] > 0  # base64 at least
    assert isinstance(line["params"], dict) and line["params"]


async def test_log_prompts_true_adds_the_prompt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (line,) = await access_lines(tmp_path, caplog, log_prompts=True)
    assert line["prompt"] == PROMPT


def test_secrets_of_finds_every_secret_in_the_settings(tmp_path: Path) -> None:
    settings = gateway_settings(
        tmp_path,
        providers={"fal": {"key": "fal-secret-123456"}, "replicate": {"api_token": "r8_secret-abcdef"}},
        storage={"backend": "s3", "s3": {"bucket": "b", "secret_access_key": "s3-secret-zyxwvu"}},
    )
    assert {"fal-secret-123456", "r8_secret-abcdef", "s3-secret-zyxwvu"} <= secrets_of(settings)


@pytest.mark.parametrize("formatter_class", [JsonFormatter, TextFormatter])
def test_formatters_redact_secrets_wherever_they_appear(formatter_class: type[logging.Formatter]) -> None:
    formatter = formatter_class(secrets=["sk-very-secret-value"])  # type: ignore[call-arg]
    try:
        raise ValueError("upstream said: bad key sk-very-secret-value")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    args = ("sk-very-secret-value",)
    record = logging.LogRecord("imagegate.x", logging.WARNING, __file__, 1, "key=%s", args, exc_info)
    setattr(record, FIELDS_ATTR, {"header": "Bearer sk-very-secret-value"})
    text = formatter.format(record)
    assert "sk-very-secret-value" not in text and REDACTED in text
    if formatter_class is JsonFormatter:
        line = json.loads(text)
        assert line["level"] == "warning" and line["time"].endswith("Z") and "exception" in line


async def test_the_request_log_never_holds_a_whole_image_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An image URL's id is its only credential (GET /v1/files/images/{id} is open): the request
    log keeps a short prefix to find the request by, never the id itself."""
    app = create_app(gateway_settings(tmp_path))
    caplog.set_level(logging.INFO, logger="imagegate.access")
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://g") as client:
        made = await client.post(
            "/v1/images/generations", json={"model": "sandbox-image", "prompt": "x", "size": "64x64"}
        )
        image_id = made.json()["data"][0]["url"].rsplit("/", 1)[-1]
        assert (await client.get(f"/v1/files/images/{image_id}")).status_code == 200
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "imagegate.access"]
    served = json.loads(lines[-1])
    assert served["endpoint"] == "/v1/files/images/{image_id}" and served["status"] == 200
    assert served["path"].startswith("/v1/files/images/" + image_id[:6])
    assert not any(image_id in line for line in lines)


async def test_a_path_cannot_forge_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The server decodes `%0d%0a` in a path: the text log must not start a new line from it."""
    app = create_app(gateway_settings(tmp_path))
    caplog.set_level(logging.INFO, logger="imagegate.access")
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://g") as client:
        await client.get("/nope%0d%0aINFO:%20imagegate.access:%20forged%00")
    (record,) = [r for r in caplog.records if r.name == "imagegate.access"]
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x00" not in line
    assert "forged" in line
