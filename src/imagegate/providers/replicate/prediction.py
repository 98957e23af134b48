"""The state of one Replicate prediction (the JSON `GET urls.get` returns), shared by the
transport (polling), the failure table (`errors.map_error`) and the output parser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["TERMINAL_STATUSES", "Prediction"]

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "aborted"})


@dataclass
class Prediction:
    """The latest known state of one prediction."""

    data: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.data.get("id", ""))

    @property
    def status(self) -> str:
        return str(self.data.get("status", ""))

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def done(self) -> bool:
        """Terminal, or `processing` with every output file already there (sync mode)."""
        return self.terminal or (self.status == "processing" and bool(self.data.get("output")))

    def url(self, name: Literal["get", "cancel"], base_url: str) -> str:
        urls = self.data.get("urls")
        value = urls.get(name) if isinstance(urls, dict) else None
        if isinstance(value, str) and value:
            return value
        return f"{base_url}/predictions/{self.id}" + ("/cancel" if name == "cancel" else "")
