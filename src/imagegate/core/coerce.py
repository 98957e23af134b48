"""Coercing a table rule's value to its declared type."""

from __future__ import annotations

import math
from typing import Any

from imagegate.core.errors import InvalidRequest

__all__ = ["coerce_value"]

_BOOL_TEXT = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def coerce_value(value: Any, kind: type, param: str) -> Any:
    """`value` as `kind` (bool, int, float or str); multipart strings such as "false" or "4" are
    converted, anything that does not fit is a 400 naming `param`."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _BOOL_TEXT:
                return _BOOL_TEXT[value.strip().lower()]
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            result = float(value)
            if not math.isfinite(result):
                raise ValueError
            return result
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise InvalidRequest(f"Invalid type for '{param}': expected {kind.__name__}, got {value!r}.", param=param)
