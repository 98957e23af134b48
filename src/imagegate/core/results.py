"""What the service hands back to the HTTP layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imagegate.core.errors import GatewayError

__all__ = ["DryRunResult", "ImageResult", "OutputImage", "resolved_quality"]

#: The `quality` values an ImagesResponse reports (OpenAI's, newest SDKs included).
RESPONSE_QUALITIES = frozenset({"low", "medium", "high", "xhigh", "max"})
_DALL_E_QUALITIES = {"hd": "high", "standard": "medium"}
# What a model without a quality setting is reported as producing: its one (full) quality level.
DEFAULT_QUALITY = "high"


def resolved_quality(requested: str | None, *, honoured: bool) -> str:
    """The `quality` the response reports: the requested level when the provider was given it
    (`honoured`: passed through, renamed or converted; dall-e's `hd`/`standard` read as
    `high`/`medium`), else the model's own level. Never `auto`, never an ignored value."""
    if honoured and requested is not None:
        value = _DALL_E_QUALITIES.get(requested, requested)
        if value in RESPONSE_QUALITIES:
            return value
    return DEFAULT_QUALITY


@dataclass(slots=True)
class OutputImage:
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None

    def as_json(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.url is not None:
            out["url"] = self.url
        if self.b64_json is not None:
            out["b64_json"] = self.b64_json
        if self.revised_prompt is not None:
            out["revised_prompt"] = self.revised_prompt
        return out


def _usage() -> dict[str, Any]:
    return {
        "total_tokens": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
        "output_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    }


@dataclass(slots=True)
class ImageResult:
    """A finished request: OpenAI's ImagesResponse plus the gateway's response headers."""

    created: int
    data: list[OutputImage]
    size: str | None
    output_format: str
    quality: str
    background: str
    headers: dict[str, str] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=_usage)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "created": self.created,
            "data": [image.as_json() for image in self.data],
            "background": self.background,
            "output_format": self.output_format,
            "quality": self.quality,
            "usage": self.usage,
        }
        if self.size is not None:
            out["size"] = self.size
        return out


@dataclass(slots=True)
class DryRunResult:
    """What would be sent upstream, without sending it."""

    model: str
    provider: str
    upstream_model: str
    payloads: list[dict[str, Any]]
    params: dict[str, str]
    notes: dict[str, str]
    target_size: str | None
    headers: dict[str, str] = field(default_factory=dict)
    routes: list[dict[str, str]] = field(default_factory=list)  # every route of the model, in order
    # No route's provider is configured: what the real request would answer (not in the body).
    unavailable: GatewayError | None = None

    def body(self) -> dict[str, Any]:
        return {
            "object": "imagegate.dry_run",
            "model": self.model,
            "provider": self.provider,
            "upstream_model": self.upstream_model,
            "payloads": self.payloads,
            "params": self.params,
            "notes": self.notes,
            "target_size": self.target_size,
            "routes": self.routes,
        }
