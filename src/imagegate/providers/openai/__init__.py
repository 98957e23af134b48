"""An OpenAI-compatible Images API upstream (OpenAI, Azure OpenAI v1, another imagegate); plain httpx."""

from __future__ import annotations

from imagegate.providers.openai.provider import OpenAIProvider

__all__ = ["OpenAIProvider"]
