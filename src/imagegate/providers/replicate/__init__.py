"""Replicate: Qwen image models through the predictions API (plain httpx, no SDK)."""

from __future__ import annotations

from imagegate.providers.replicate.provider import ReplicateProvider

__all__ = ["ReplicateProvider"]
