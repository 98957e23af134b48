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
from imagegate.core import redact
from imagegate.core.redact import REDACTED
from imagegate.observability.logs import FIELDS_ATTR, JsonFormatter, TextFormatter

PROMPT = "grayscale with the-words-of-the-prompt"


async def access_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture, **logging_settings: object) -> list[dict]:
    app = create_app(gateway_settings(tmp_path, logging=logging_settings))
    caplog.set_level(logging.INFO, logger="imagegate.requests")
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
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == "imagegate.requests"]


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


def test_configured_secrets_are_remembered(tmp_path: Path) -> None:
    create_app(
        gateway_settings(
            tmp_path,
            providers={"fal": {"key": "fal-secret-123456"}, "replicate": {"api_token": "r8_secret-abcdef"}},
            storage={
                "backend": "s3",
                "s3": {"bucket": "b", "access_key_id": "id", "secret_access_key": "s3-secret-zyxwvu"},
            },
        )
    )
    line = JsonFormatter().format(
        logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "%s %s", ("s3-secret-zyxwvu", "x"), None)
    )
    assert "s3-secret-zyxwvu" not in line and REDACTED in line


@pytest.mark.parametrize("formatter_class", [JsonFormatter, TextFormatter])
def test_formatters_redact_secrets_wherever_they_appear(formatter_class: type[logging.Formatter]) -> None:
    redact.remember_secret("sk-very-secret-value")
    formatter = formatter_class()
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


async def test_image_ids_stay_out_of_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(gateway_settings(tmp_path))
    caplog.set_level(logging.DEBUG)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://g") as client:
        response = await client.post(
            "/v1/images/edits",
            data={"model": "sandbox-edit", "prompt": "invert", "response_format": "url"},
            files={"image": ("a.png", png_bytes(20, 20), "image/png")},
        )
        url = response.json()["data"][0]["url"]
        assert (await client.get(url)).status_code == 200
    image_id = url.rsplit("/", 1)[1]
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name != "httpx"]  # httpx: this test's client
    fetch = [line for line in lines if line.get("endpoint") == "/v1/files/images/{image_id}"]
    assert len(fetch) == 1 and fetch[0]["path"] == "/v1/files/images/{image_id}" and fetch[0]["status"] == 200
    assert not any(image_id in json.dumps(line) for line in lines)


async def test_a_path_cannot_forge_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The server decodes `%0d%0a` in a path: the text log must not start a new line from it."""
    from imagegate.observability.middleware import access_log

    app = create_app(gateway_settings(tmp_path))
    caplog.set_level(logging.INFO, logger=access_log.name)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://g") as client:
        await client.get("/nope%0d%0aINFO:%20imagegate.access:%20forged%00")
    (record,) = [r for r in caplog.records if r.name == access_log.name]
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x00" not in line
    assert "forged" in line


SECRET_PROMPT = "a lighthouse at dusk,\nits keeper's name is \"Quokka Zebrafish\" and nobody may know it"


def _gateway_error_lines(formatter: logging.Formatter, upstream_body: str) -> list[str]:
    """The WARNING an upstream 5xx leaves, formatted while its request (with SECRET_PROMPT) runs."""
    from imagegate.api.errors import error_response
    from imagegate.core import telemetry
    from imagegate.core.errors import UpstreamError

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("imagegate.api.errors")
    logger.addHandler(handler)
    _, token = telemetry.begin({"request_id": "req-mask"})
    try:
        telemetry.note_request(model="m", operation="generate", prompt=SECRET_PROMPT)
        error_response(UpstreamError(f"The upstream failed: {redact.upstream_text(upstream_body)}"), "req-mask")
        return [formatter.format(record) for record in records]
    finally:
        telemetry.end(token)
        logger.removeHandler(handler)


@pytest.mark.parametrize("formatter_class", [JsonFormatter, TextFormatter])
@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"detail": f"model crashed on prompt: {SECRET_PROMPT}"}),  # echoed whole
        f"<html><title>500 for prompt {SECRET_PROMPT}</title></html>",
        "error: " + " ".join([SECRET_PROMPT] * 20),  # echoed and truncated by the redaction cap
    ],
)
def test_an_upstream_error_echoing_the_prompt_keeps_it_out_of_the_log(
    formatter_class: type[JsonFormatter] | type[TextFormatter], body: str
) -> None:
    (line,) = _gateway_error_lines(formatter_class(mask_prompts=True), body)
    assert "req-mask" in line and "The upstream failed" in line
    for words in ("lighthouse", "Quokka", "Zebrafish", "nobody may know"):
        assert words not in line, line
    assert "[prompt]" in line


def test_log_prompts_true_leaves_an_echoed_prompt_in_the_log(tmp_path: Path) -> None:
    from imagegate.observability.logs import configure_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        for log_prompts, masked in ((False, True), (True, False)):
            configure_logging(gateway_settings(tmp_path, logging={"log_prompts": log_prompts}))
            formatter = root.handlers[0].formatter
            assert isinstance(formatter, TextFormatter)
            (line,) = _gateway_error_lines(formatter, f"failed on {SECRET_PROMPT}")
            assert ("Zebrafish" not in line) is masked
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.mark.parametrize(("level", "client_lines"), [("info", False), ("debug", True)])
def test_upstream_calls_log_a_line_each_only_at_debug(tmp_path: Path, level: str, client_lines: bool) -> None:
    """The access log is the request's line; the HTTP client's line per upstream call (three for a
    fal queue job) stays out of the hot path unless `log_level: debug`."""
    from imagegate.observability.logs import configure_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(gateway_settings(tmp_path, log_level=level))
        assert logging.getLogger("httpx").isEnabledFor(logging.INFO) is client_lines
        assert logging.getLogger("httpcore").isEnabledFor(logging.INFO) is client_lines
        assert logging.getLogger("imagegate.requests").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.NOTSET)
