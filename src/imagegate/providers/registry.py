"""Provider name -> adapter class: the one place that knows every provider."""

from __future__ import annotations

import httpx

from imagegate.core.imaging import ImagePool
from imagegate.providers.base import Provider
from imagegate.providers.fal.provider import FalProvider
from imagegate.providers.openai.provider import OpenAIProvider
from imagegate.providers.replicate.provider import ReplicateProvider
from imagegate.providers.sandbox.provider import SandboxProvider
from imagegate.settings import Settings

__all__ = ["PROVIDERS", "build_providers"]

PROVIDERS: dict[str, type[Provider]] = {
    FalProvider.name: FalProvider,
    ReplicateProvider.name: ReplicateProvider,
    OpenAIProvider.name: OpenAIProvider,
    SandboxProvider.name: SandboxProvider,
}


def build_providers(http: httpx.AsyncClient, settings: Settings, pool: ImagePool) -> dict[str, Provider]:
    """One adapter instance per provider, all sharing the app's HTTP client."""
    providers: dict[str, Provider] = {
        name: cls(http, settings) for name, cls in PROVIDERS.items() if cls is not SandboxProvider
    }
    providers[SandboxProvider.name] = SandboxProvider(http, settings, pool=pool)
    return providers
