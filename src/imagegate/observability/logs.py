"""Logging: `logging.format: text` (a terminal) or `json` (one object per line), with secrets redacted.

A JSON line always has `time` (UTC, ISO 8601, milliseconds), `level`, `logger`, `message`, and
`request_id` while a request is being served. The request log line (logger `imagegate.access`,
one per request) adds the fields of `RequestLog` (see `observability.middleware`). Exceptions go
in `exception` as text. Every configured secret (each `SecretStr` of the settings: provider keys
and tokens, client keys, the S3 secret) is replaced by `[redacted]` in every line, whatever logged it.

`configure_logging(settings)` installs one handler on the root logger; in json mode it also routes
uvicorn's loggers through it and silences `uvicorn.access` (the request log replaces it).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, SecretStr

from imagegate.core import telemetry
from imagegate.settings import Settings

__all__ = ["REDACTED", "JsonFormatter", "TextFormatter", "configure_logging", "secrets_of"]

REDACTED = "[redacted]"
FIELDS_ATTR = "imagegate_fields"  # `extra={FIELDS_ATTR: {...}}` adds structured fields to a JSON line
_MIN_SECRET = 6  # shorter values would redact ordinary words


def secrets_of(value: Any) -> set[str]:
    """Every SecretStr value inside a settings object (models, lists, dicts)."""
    found: set[str] = set()
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        if len(secret) >= _MIN_SECRET:
            found.add(secret)
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            found |= secrets_of(getattr(value, name, None))
    elif isinstance(value, dict):
        for item in value.values():
            found |= secrets_of(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            found |= secrets_of(item)
    return found


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Redacting(logging.Formatter):
    def __init__(self, fmt: str | None = None, *, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self.secrets = sorted(set(secrets), key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


class TextFormatter(_Redacting):
    def __init__(self, *, secrets: Iterable[str] = ()) -> None:
        super().__init__("%(levelname)s:     %(name)s: %(message)s", secrets=secrets)

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(_Redacting):
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
        return self.redact(json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":")))


def configure_logging(settings: Settings) -> None:
    """One stderr handler on the root logger, in the configured format, at `log_level`."""
    secrets = secrets_of(settings)
    json_lines = settings.logging.format == "json"
    formatter = JsonFormatter(secrets=secrets) if json_lines else TextFormatter(secrets=secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    if json_lines:
        for name in ("uvicorn", "uvicorn.error"):
            uvicorn_logger = logging.getLogger(name)
            uvicorn_logger.handlers.clear()
            uvicorn_logger.propagate = True
        logging.getLogger("uvicorn.access").disabled = True
