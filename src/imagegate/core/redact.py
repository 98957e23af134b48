"""Upstream text is untrusted: the one mechanism that makes it safe to show or log.

An upstream (a provider, a misconfigured proxy, an HTML error page) may echo the request it got,
`Authorization` header included. So every piece of upstream text that becomes part of a client
message goes through `upstream_text` (identifiers such as a `param` or `code` through
`upstream_token`), and every `imagegate` log record through `RedactingFilter`:

    upstream_text(value, limit)   markup stripped (an HTML page -> its title, or its text), entities
                                  decoded, Python object reprs and control characters removed, then
                                  `scrub`, whitespace collapsed, capped at `limit` characters
    upstream_token(value)         a short identifier (`[A-Za-z0-9_.:\\[\\]-]`), or None when it is
                                  not one or carries a secret
    scrub(text)                   every configured secret (and its URL-, JSON- and base64-encoded
                                  forms) and anything shaped like a credential (`Key …`, `Bearer …`,
                                  `Basic …`, `r8_…`, `sk-…`, fal `id:secret`, `api_key=…`) -> `[redacted]`
    remember_secrets(settings)    add every SecretStr in the settings, every password inside a URL
                                  setting (e.g. `redis.url`) and the route `api_key_env` variables to
                                  the secrets `scrub` removes
    install_log_filter()          `RedactingFilter` on the `imagegate` (and `httpx`, `httpcore`) loggers
                                  and their children

The secrets live in one process-wide, add-only set: log records can come from any module, and
masking a secret of another gateway instance in the same process costs nothing.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, SecretStr

__all__ = [
    "REDACTED",
    "RedactingFilter",
    "install_log_filter",
    "remember_secret",
    "remember_secrets",
    "scrub",
    "upstream_text",
    "upstream_token",
]

REDACTED = "[redacted]"
DEFAULT_LIMIT = 300
MIN_SECRET_CHARS = 4  # shorter values would mask ordinary words; such a secret is no secret anyway

_lock = threading.Lock()
_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None

# Credential shapes. A value must look like a token (8+ characters with a digit or punctuation other
# than a full stop) so that prose such as "Token limit reached" or "Incorrect API key provided." survives.
_TOKEN = r"(?=[A-Za-z0-9._~+/=:\-]*[0-9_~+/=:\-])[A-Za-z0-9._~+/=:\-]{8,}"
# (pattern, replacement, triggers): a pattern runs only when one of its triggers is in the lowered
# text, so an ordinary log line costs a few substring checks.
_SHAPES: tuple[tuple[re.Pattern[str], str, tuple[str, ...]], ...] = (
    (re.compile(rf"(?i)\b(key|bearer|basic|token|digest)(\s+|%20|\+)({_TOKEN})"), rf"\1\2{REDACTED}",
     ("key", "bearer", "basic", "token", "digest")),
    (re.compile(r"\br8_[A-Za-z0-9_\-]{6,}"), REDACTED, ("r8_",)),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"), REDACTED, ("sk-",)),
    (re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}:[0-9a-zA-Z]{8,}"),
     REDACTED, (":",)),
    (re.compile(
        r"(?i)((?:authorization|proxy-authorization|x-api-key|api[-_]?key|api[-_]?token|access[-_]?token"
        r"|fal[-_]?key|secret|password)[\"']?\s*[:=]\s*[\"']?)(?:(?:key|bearer|basic|token|digest)\s+)?+"
        rf"(?!\[redacted\]){_TOKEN}"),
     rf"\1{REDACTED}", ("authorization", "key", "token", "secret", "password")),
)  # fmt: skip
_OBJECT_REPR = re.compile(r"<[\w.]+(?: object)? at 0x[0-9a-fA-F]+>")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_SPACE = re.compile(r"\s+")
_TAG = re.compile(r"<[A-Za-z!/?][^<>]*>")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)
_HIDDEN = re.compile(r"<(script|style|head)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_SAFE_TOKEN = re.compile(r"\A[A-Za-z0-9_.:\[\]\-]{1,64}\Z")


def remember_secret(value: str | None) -> None:
    """Add one secret (and its encoded forms, and both halves of an `id:secret` pair) to the set."""
    if not value or len(value) < MIN_SECRET_CHARS:
        return
    forms = {value, quote(value, safe=""), json.dumps(value)[1:-1], html.escape(value)}
    forms.add(base64.b64encode(value.encode()).decode().rstrip("="))
    head, sep, tail = value.partition(":")
    if sep and len(head) >= 8 and len(tail) >= 8:
        forms.update((head, tail))
    global _secret_pattern
    with _lock:
        if forms <= _secrets:
            return
        _secrets.update(form for form in forms if len(form) >= MIN_SECRET_CHARS)
        longest_first = sorted(_secrets, key=len, reverse=True)
        _secret_pattern = re.compile("|".join(re.escape(secret) for secret in longest_first))


def remember_secrets(settings: Any) -> None:
    """Every SecretStr anywhere in `settings` (a pydantic model), plus the environment variables
    that routes name as `api_key_env`."""
    for secret in _secret_values(settings):
        remember_secret(secret)
    models = getattr(settings, "models", None) or {}
    for model in models.values():
        for route in getattr(model, "routes", ()):
            env_name = (getattr(route, "options", None) or {}).get("api_key_env")
            if isinstance(env_name, str):
                remember_secret(os.environ.get(env_name))


def _secret_values(value: Any) -> Iterable[str]:
    if isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, str) and "://" in value and "@" in value:  # a password in a URL (redis://:pw@host)
        try:
            password = urlsplit(value).password
        except ValueError:
            password = None
        if password:
            yield password
            yield unquote(password)
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _secret_values(getattr(value, name, None))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _secret_values(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _secret_values(item)


def scrub(text: str) -> str:
    """`text` without any configured secret or anything shaped like a credential."""
    pattern = _secret_pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    lowered = text.lower()
    for shape, replacement, triggers in _SHAPES:
        for trigger in triggers:  # (a loop, not any(): this runs on every log record)
            if trigger in lowered:
                text = shape.sub(replacement, text)
                lowered = text.lower()
                break
    return text


def upstream_text(value: Any, *, limit: int = DEFAULT_LIMIT) -> str:
    """Text an upstream wrote, safe to put in a client message or a log line ("" for non-text)."""
    if not isinstance(value, str) or not value:
        return ""
    text = value[: max(4096, limit * 16)]  # bounded work (the markup patterns scan ahead), whatever was sent
    if _TAG.search(text):
        title = _TITLE.search(text)
        text = title.group(1) if title and title.group(1).strip() else _TAG.sub(" ", _HIDDEN.sub(" ", text))
    text = html.unescape(text)
    text = _OBJECT_REPR.sub("", text)
    text = _CONTROL.sub(" ", text)
    text = _SPACE.sub(" ", scrub(text)).strip()
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def upstream_token(value: Any) -> str | None:
    """A short identifier from an upstream (a parameter name, an error code), or None when it is
    not one or carries a secret."""
    if not isinstance(value, str) or not _SAFE_TOKEN.match(value):
        return None
    return value if scrub(value) == value else None


class RedactingFilter(logging.Filter):
    """Scrubs every record: its message (arguments merged in), its traceback and its stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler's own error path
            return True
        cleaned = scrub(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


_FILTER = RedactingFilter()


def install_log_filter(roots: Iterable[str] = ("imagegate", "httpx", "httpcore")) -> None:
    """Attach the filter to each root logger and every logger below it that exists now (idempotent).
    Logger filters do not apply to records of child loggers, hence one per logger. (httpx logs the
    URLs it calls, which an upstream chose.)"""
    existing = list(logging.root.manager.loggerDict)
    for root in roots:
        names = {root, *(name for name in existing if name.startswith(root + "."))}
        for name in names:
            logger = logging.getLogger(name)
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
