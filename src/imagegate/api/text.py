"""Request text is Unicode, or a 400 naming the field.

`json` accepts lone surrogates (`"\\ud800"` decodes to a `str` no encoder will take: not httpx's
JSON for a provider, not a log handler, not our own error envelope), and Starlette reads a multipart
text part that is not valid UTF-8 as latin-1 without a word. `check_unicode` walks a parsed JSON
body; `StrictTextParser` records the undecodable parts of a multipart body. Both end in
`invalid_text`, which names the field (escaped, since the name itself may be the culprit).
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

from imagegate.core.errors import InvalidRequest

__all__ = ["StrictTextParser", "check_unicode", "invalid_text", "read_form"]


class StrictTextParser(MultiPartParser):
    """Starlette's multipart parser, except that a text part that does not decode in the form's
    charset is recorded in `undecodable` (Starlette itself falls back to latin-1 without a word)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.undecodable: list[str] = []

    def on_part_end(self) -> None:
        # Starlette's part state is private: read defensively, so a change there disables this
        # check (the tests in tests/resilience/test_input_edges.py then fail) instead of every upload.
        part = getattr(self, "_current_part", None)
        data = getattr(part, "data", None)
        if part is not None and getattr(part, "file", None) is None and isinstance(data, bytes | bytearray):
            try:
                bytes(data).decode(getattr(self, "_charset", "") or "utf-8")
            except (UnicodeDecodeError, LookupError):
                self.undecodable.append(str(getattr(part, "field_name", "")))
        super().on_part_end()


async def read_form(request: Request, *, strict: bool, max_files: int, max_fields: int, max_part_size: int) -> FormData:
    """The request's form: with `strict` (multipart), through `StrictTextParser`, and a text part
    that is not valid UTF-8 is `invalid_text` naming it. Starlette's own exceptions propagate."""
    if not strict:
        return await request.form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)
    async with aclosing(request.stream()) as stream:
        parser = StrictTextParser(
            request.headers, stream, max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
        )
        form = await parser.parse()
    if parser.undecodable:
        await form.close()
        raise invalid_text(parser.undecodable[0], "is not valid UTF-8 text")
    return form


def check_unicode(body: dict[str, Any]) -> None:
    """Every string in the body (keys included, at any depth) is encodable Unicode: `json` accepts
    lone surrogates (`"\\ud800"`), which no encoder after it does. The first offender is a 400
    naming its top-level field. Big strings (data URIs) are ASCII and pass `isascii()` at C speed."""
    for key, value in body.items():
        stack: list[Any] = [key, value]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                if not item.isascii() and not _encodable(item):
                    raise invalid_text(key, "is not valid Unicode text (it holds a lone surrogate)")
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def invalid_text(param: str, problem: str) -> InvalidRequest:
    """A field whose text is not Unicode; `param` is shown escaped, as it may be the culprit itself."""
    shown = param if param.isascii() and param.isprintable() else param.encode("unicode_escape", "backslashreplace")
    name = shown if isinstance(shown, str) else shown.decode("ascii")[:80]
    return InvalidRequest(f"Invalid value for '{name}': the text {problem}.", param=name)
