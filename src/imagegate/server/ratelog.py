"""Kept for existing imports: `RateLimitedLog` lives in `imagegate.observability.ratelog`."""

from __future__ import annotations

from imagegate.observability.ratelog import RateLimitedLog

__all__ = ["RateLimitedLog"]
