from __future__ import annotations

from typing import Any

import pytest

from imagegate.api.text import check_unicode, invalid_text
from imagegate.core.errors import InvalidRequest


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "\ud800 cat"}, "prompt"),
        ({"prompt": "ok", "loras": [{"path": "a", "tags": ["x", "\udc80"]}]}, "loras"),
        ({"meta": {"\ud83d": 1}}, "meta"),  # a nested key
        ({"\udfffname": "v"}, "\\udfffname"),  # the field name itself, escaped
    ],
)
def test_check_unicode_names_the_top_level_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_unicode(body)
    assert info.value.param == param and info.value.status == 400 and info.value.code == "invalid_value"
    info.value.message.encode("utf-8")  # the message itself is always encodable


def test_check_unicode_accepts_any_valid_text() -> None:
    text = {"prompt": "café \U0001f600 \u2603", "images": [{"image_url": "data:image/png;base64," + "A" * 10}]}
    assert check_unicode(text) is None
    assert check_unicode({"n": 1, "flag": True, "nothing": None, "deep": [[[[{"k": "\u00e9"}]]]]}) is None


def test_invalid_text_shows_printable_ascii_names_as_they_are() -> None:
    assert invalid_text("prompt", "is bad").param == "prompt"
    assert invalid_text("pr\u00f6mpt", "is bad").param == "pr\\xf6mpt"
