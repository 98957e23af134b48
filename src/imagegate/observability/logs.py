"""Logging: `logging.format: text` (a terminal) or `json` (one object per line), with secrets redacted.

A JSON line always has `time` (UTC, ISO 8601, milliseconds), `level`, `logger`, `message`, and
`request_id` while a request is being served. The request log line (logger `imagegate.requests`,
one per request) adds the fields of `RequestLog` (see `observability.middleware`). Exceptions go
in `exception` as text. Every line, whatever logged it (uvicorn and httpx included), goes through
`core.redact.scrub` (each string value of a JSON line; the whole of a text line): each configured
secret (every `SecretStr` of the settings: provider keys and tokens, client keys, the S3 secret)
and anything shaped like a credential becomes `[redacted]`. Unless `logging.log_prompts` is true,
the prompt of the request being served becomes `[prompt]` in every line logged while it runs (an
upstream error that echoes it, whole or cut short, re-quoted or with its whitespace collapsed).

`configure_logging(settings)` installs one handler on the root logger; in json mode it also routes
uvicorn's loggers through it and silences `uvicorn.access` (the request log replaces it). The CLI
calls it before starting uvicorn (with `uvicorn_log_config`), each worker again in `app_from_env`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from imagegate.core import redact, telemetry
from imagegate.settings import Settings

__all__ = [
    "FIELDS_ATTR",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "mask_prompt",
    "uvicorn_log_config",
]

FIELDS_ATTR = "imagegate_fields"  # `extra={FIELDS_ATTR: {...}}` adds structured fields to a JSON line
PROMPT_MASK = "[prompt]"
_SEPARATOR = re.compile(r"(?:\s|\\+[nrt]?)*")  # whitespace, or its escapes in a repr or JSON string
_MIN_MASKED = 12  # a shorter run of the prompt's words is masked only if it is the whole prompt


def _match_word(text: str, pos: int, word: str) -> tuple[int, int]:
    """How far `word` matches `text` at `pos` (escaping backslashes in the text skipped): the end in
    `text` and the number of `word`'s characters matched."""
    k = 0
    while k < len(word) and pos < len(text):
        if text[pos] == word[k]:
            k += 1
        elif text[pos] != "\\":
            break
        pos += 1
    return pos, k


def mask_prompt(text: str, prompt: str | None) -> str:
    """`text` with each run of `prompt`'s words (the whole prompt, or a cut-short start of it of at
    least a few words) replaced by `[prompt]`, whatever whitespace or quoting separates them."""
    words = prompt.split() if prompt else []
    if not words or not text:
        return text
    wanted = min(len(" ".join(words)), _MIN_MASKED)
    out: list[str] = []
    done = start = 0
    while (found := text.find(words[0], start)) >= 0:
        end, covered = found, 0
        if found and text[found - 1].isalnum():  # inside another word: not the prompt's start
            start = found + 1
            continue
        for index, word in enumerate(words):
            separator = _SEPARATOR.match(text, end) if index else None
            stop, matched = _match_word(text, separator.end() if separator else end, word)
            if matched:
                end, covered = stop, covered + matched + (1 if index else 0)
            if matched < len(word):  # a different word, or the text was cut short here
                break
        if covered >= wanted:
            out += [text[done:found], PROMPT_MASK]
            done = start = end
        else:
            start = found + 1
    return "".join(out) + text[done:] if out else text


def _current_prompt() -> str | None:
    current = telemetry.current()
    return current.prompt if current is not None else None


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    def __init__(self, *, mask_prompts: bool = False) -> None:
        super().__init__("%(levelname)s:     %(name)s: %(message)s")
        self.mask_prompts = mask_prompts

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return redact.scrub(mask_prompt(text, _current_prompt()) if self.mask_prompts else text)


class JsonFormatter(logging.Formatter):
    def __init__(self, *, mask_prompts: bool = False) -> None:
        super().__init__()
        self.mask_prompts = mask_prompts

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = telemetry.current()
        request_id = current.state.get("request_id") if current is not None else None
        if isinstance(request_id, str):
            line["request_id"] = request_id
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if self.mask_prompts and (prompt := _current_prompt()):
            for name in ("message", "exception"):
                if isinstance(line.get(name), str):
                    line[name] = mask_prompt(line[name], prompt)
        # Every string value is scrubbed (not the serialized line: its punctuation and field names
        # would wake every credential pattern on every line, at several times the cost).
        return json.dumps(_scrubbed(line), ensure_ascii=False, default=str, separators=(",", ":"))


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return redact.scrub(value)
    if isinstance(value, dict):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact.scrub(str(value))


def configure_logging(settings: Settings) -> None:
    """One stderr handler on the root logger, in the configured format, at `log_level`."""
    redact.remember_secrets(settings)
    json_lines = settings.logging.format == "json"
    mask = not settings.logging.log_prompts
    formatter = JsonFormatter(mask_prompts=mask) if json_lines else TextFormatter(mask_prompts=mask)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # A request's line is the access log (`imagegate.requests`); the HTTP client's line per upstream
    # call (three for a fal queue job) is detail for `log_level: debug` only.
    client_level = logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(client_level)
    if json_lines:
        for name in ("uvicorn", "uvicorn.error"):
            uvicorn_logger = logging.getLogger(name)
            uvicorn_logger.handlers.clear()
            uvicorn_logger.propagate = True
        logging.getLogger("uvicorn.access").disabled = True


def uvicorn_log_config(settings: Settings) -> dict[str, Any] | None:
    """`uvicorn.run(log_config=...)`: uvicorn's own configuration for text; None for json, so uvicorn
    leaves the handlers `configure_logging` installed alone (in the supervisor and in every worker)."""
    if settings.logging.format == "json":
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG
