"""The OpenAI-compatible upstream adapter: OpenAI itself, Azure OpenAI's v1 API, or another imagegate.

Configuration: `providers.openai.base_url` and `api_key` (OPENAI_API_KEY). Route options override per
route: `base_url`, `api_key_env` (the environment variable holding that route's key) and
`send_response_format` (bool; default: only for the exact ids in `tables.DALLE_MODELS`). Any model id
is accepted. Inputs travel as `data:` URIs inside the payload (sent as multipart parts) or as the
caller's URLs (sent with the JSON edit form). A call is one synchronous HTTP request: cancelling `run`
closes it, and there is no upstream job left to cancel.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from imagegate.core.errors import InvalidRequest, ProviderNotConfigured
from imagegate.core.params import ParamTable
from imagegate.core.request import InputImage, Operation
from imagegate.core.sizes import SizePresets
from imagegate.providers.base import CallContext, Provider, ProviderResult, Route
from imagegate.providers.openai.tables import DALLE_MODELS, EDIT, GENERATE, OPENAI_PRESETS
from imagegate.providers.openai.transport import OpenAITransport, build_call, download_output
from imagegate.providers.resume import unresumable_call

__all__ = ["OpenAIProvider"]


class OpenAIProvider(Provider):
    name = "openai"

    @property
    def _config(self) -> Any:
        return self.settings.providers.openai

    def check_configured(self) -> None:
        if self._config.api_key is None:
            raise ProviderNotConfigured("provider openai is not configured: set OPENAI_API_KEY")

    def models(self) -> Sequence[str]:
        return ()  # any model id

    def table(self, model: str, operation: Operation) -> ParamTable:
        return EDIT if operation == "edit" else GENERATE

    def size_presets(self, model: str) -> SizePresets:
        return OPENAI_PRESETS

    def transport(self, options: Mapping[str, Any]) -> OpenAITransport:
        """The transport for one route: its `base_url` and key (`api_key_env`), else the provider's."""
        base_url = str(options.get("base_url") or self._config.base_url)
        env_name = options.get("api_key_env")
        if env_name:
            api_key = os.environ.get(str(env_name)) or None
            if api_key is None:
                raise ProviderNotConfigured(f"provider openai is not configured for this route: set {env_name}")
        else:
            self.check_configured()
            api_key = self._config.api_key.get_secret_value()
        return OpenAITransport(self.http, base_url=base_url, api_key=api_key)

    async def prepare_images(self, images: Sequence[InputImage], route: Route, *, dry_run: bool = False) -> list[str]:
        """Bytes -> `data:` URI (sent as a multipart part; a placeholder with `dry_run`); URLs as given."""
        refs: list[str] = []
        for index, image in enumerate(images):
            if image.data is not None:
                refs.append(
                    f"<multipart part: image-{index}, {image.mime}, {len(image.data)} bytes>"
                    if dry_run
                    else image.data_uri()
                )
            elif image.url is not None:
                refs.append(image.url)
            else:
                raise InvalidRequest("An input image has neither bytes nor a URL.", param="image")
        return refs

    def sends_response_format(self, route: Route) -> bool:
        """`response_format: b64_json` only for dall-e models (exact ids) unless the route says otherwise."""
        explicit = route.options.get("send_response_format")
        return bool(explicit) if explicit is not None else route.model in DALLE_MODELS

    async def run(self, payload: dict[str, Any], route: Route, ctx: CallContext) -> ProviderResult:
        transport = self.transport(route.options)
        call = build_call(
            ctx.operation,
            route.model,
            payload,
            response_format=self.sends_response_format(route),
            single_image=route.model in DALLE_MODELS,
        )
        async with unresumable_call(ctx.hooks, self.name, route.model, payload):
            return await transport.call(call, deadline=ctx.deadline, output_format=payload.get("output_format"))

    async def download(self, url: str) -> bytes:
        return await download_output(self.http, url, max_bytes=self.max_output_bytes)
