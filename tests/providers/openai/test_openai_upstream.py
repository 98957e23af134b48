"""The OpenAI-compatible upstream: golden payloads, exact wire requests (respx) and the error mapping."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from imagegate.core.errors import (
    ContentPolicyViolation,
    GatewayError,
    InsufficientCredit,
    InvalidRequest,
    PayloadTooLarge,
    ProviderNotConfigured,
    ProviderUnavailable,
    RateLimited,
    UnsupportedParameter,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamTimeout,
)
from imagegate.core.params import BuildContext, Mode
from imagegate.core.plan import Plan, apply_table
from imagegate.core.request import ImageRequest, InputImage
from imagegate.core.sizes import resolve_target
from imagegate.providers.base import CallContext, ProviderImage, ProviderResult, Route
from imagegate.providers.openai import OpenAIProvider
from imagegate.settings import OpenAISettings, ProvidersSettings, Settings

API = "https://api.openai.com/v1"
KEY = "sk-test-secret-key"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16
WEBP = b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 8
B64 = base64.b64encode(PNG).decode()


def settings(**openai: Any) -> Settings:
    return Settings(providers=ProvidersSettings(openai=OpenAISettings(**{"api_key": KEY, **openai})))


@pytest.fixture
def provider(http: httpx.AsyncClient) -> OpenAIProvider:
    return OpenAIProvider(http, settings())


def ctx(operation: Any = "generate") -> CallContext:
    return CallContext(request_id="req-1", deadline=time.monotonic() + 60, operation=operation)


def images_response(*items: dict[str, Any]) -> httpx.Response:
    return httpx.Response(200, json={"created": 1, "data": list(items)}, headers={"x-request-id": "req_up_1"})


async def plan(provider: OpenAIProvider, model: str, request: ImageRequest) -> Plan:
    route = Route("openai", model)
    refs = await provider.prepare_images(request.images, route)
    mask_ref = (await provider.prepare_images([request.mask], route))[0] if request.mask else None
    target = resolve_target(
        size=request.size,
        aspect_ratio=request.aspect_ratio,
        resolution=request.resolution,
        presets=provider.size_presets(model),
    )
    table = provider.table(model, request.operation)
    ctx_ = BuildContext(request.operation, target=target)
    return apply_table(table, request, ctx_, image_refs=refs, mask_ref=mask_ref)


def generate(**kw: Any) -> ImageRequest:
    return ImageRequest(operation="generate", prompt="an otter", model="gpt-image-1", **kw)


def edit(**kw: Any) -> ImageRequest:
    kw.setdefault("images", [InputImage(data=PNG, format="png")])
    return ImageRequest(operation="edit", prompt="make it blue", model="gpt-image-1", **kw)


def multipart(request: httpx.Request) -> list[tuple[str, str | None, str | None, bytes]]:
    """(name, filename, content type, bytes) for each part, in order."""
    raw = b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + request.content
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    parts = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        name = part.get_param("name", header="content-disposition")
        assert isinstance(name, str)
        parts.append((name, part.get_filename(), part.get("content-type"), payload))
    return parts


def fields(request: httpx.Request) -> dict[str, str]:
    return {name: data.decode() for name, filename, _, data in multipart(request) if filename is None}


# ---- tables (golden payloads) ------------------------------------------------------------------


async def test_generation_golden(provider: OpenAIProvider) -> None:
    request = generate(
        n=3,
        size="1536x1024",
        quality="high",
        background="transparent",
        output_format="webp",
        output_compression=50,
        moderation="low",
        style="vivid",
        user="u-1",
    )
    result = await plan(provider, "gpt-image-1", request)
    assert result.payloads == [
        {
            "prompt": "an otter",
            "n": 3,
            "size": "1536x1024",
            "quality": "high",
            "background": "transparent",
            "output_format": "webp",
            "output_compression": 50,
            "moderation": "low",
            "style": "vivid",
            "user": "u-1",
        }
    ]
    assert result.outcomes["n"] is Mode.RENAMED  # native, one call
    assert result.outcomes["size"] is Mode.CONVERTED


async def test_n_above_ten_is_fanned_out(provider: OpenAIProvider) -> None:
    result = await plan(provider, "gpt-image-1", generate(n=12))
    assert [p["n"] for p in result.payloads] == [10, 2]
    assert result.outcomes["n"] is Mode.EMULATED


@pytest.mark.parametrize(
    ("kw", "size"),
    [
        ({"size": "auto"}, "auto"),
        ({"aspect_ratio": "16:9"}, "1536x1024"),
        ({"aspect_ratio": "9:16"}, "1024x1536"),
        ({"size": "1024x1024"}, "1024x1024"),
        ({"size": "1920x1088"}, "1920x1088"),
    ],
)
async def test_size_from_the_size_target(provider: OpenAIProvider, kw: dict[str, str], size: str) -> None:
    result = await plan(provider, "gpt-image-2", generate(**kw))
    assert result.payloads[0]["size"] == size


async def test_gif_is_emulated_from_png(provider: OpenAIProvider) -> None:
    result = await plan(provider, "gpt-image-1", generate(output_format="gif"))
    assert result.payloads[0]["output_format"] == "png" and result.outcomes["output_format"] is Mode.EMULATED


async def test_other_providers_options_ignored_unknown_forwarded(provider: OpenAIProvider) -> None:
    request = generate(seed=4, extra={"acceleration": "high", "go_fast": True, "partial_x": 1})
    result = await plan(provider, "gpt-image-1", request)
    assert result.payloads == [{"prompt": "an otter", "n": 1, "seed": 4, "partial_x": 1}]
    assert set(result.notes) == {"acceleration", "go_fast"}


async def test_generation_rejects_image_and_mask(provider: OpenAIProvider) -> None:
    request = generate(mask=InputImage(data=PNG, format="png"))
    with pytest.raises(UnsupportedParameter) as info:
        await plan(provider, "gpt-image-1", request)
    assert info.value.param == "mask"


def test_any_model(provider: OpenAIProvider) -> None:
    assert provider.models() == ()
    assert provider.table("anything-at-all", "edit") is not provider.table("anything-at-all", "generate")


# ---- generations on the wire -------------------------------------------------------------------


async def test_generation_request_and_response(provider: OpenAIProvider, mock: respx.MockRouter) -> None:
    route = mock.post(f"{API}/images/generations").mock(
        return_value=images_response(
            {"b64_json": B64, "revised_prompt": "an otter, detailed"}, {"b64_json": base64.b64encode(JPEG).decode()}
        )
    )
    payload = {"prompt": "an otter", "n": 2, "size": "1024x1024", "output_format": "png", "quality": "high"}
    result = await provider.run(dict(payload), Route("openai", "gpt-image-1"), ctx())
    request = route.calls.last.request
    assert json.loads(request.content) == {"model": "gpt-image-1", **payload}  # no response_format for GPT models
    assert request.headers["authorization"] == f"Bearer {KEY}"
    # b64_json is not decoded here (that is CPU work for the image pool at delivery): a data URI.
    jpeg_uri = "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()
    assert result == ProviderResult(
        images=[
            ProviderImage(url="data:image/png;base64," + B64, content_type="image/png"),
            ProviderImage(url=jpeg_uri, content_type="image/jpeg"),
        ],
        request_id="req_up_1",
        revised_prompt="an otter, detailed",
    )
    assert all(image.data is None and (image.url or "").startswith("data:") for image in result.images)
    assert await provider.fetch(result.images[1]) == JPEG


@pytest.mark.parametrize(
    ("model", "options", "sent"),
    [
        ("dall-e-3", {}, True),
        ("dall-e-2", {}, True),
        ("dall-e-3", {"send_response_format": False}, False),
        ("gpt-image-1", {"send_response_format": True}, True),
        ("dall-e-3-preview", {}, False),  # exact ids only
        ("my-dall-e-2", {}, False),
    ],
)
async def test_response_format_only_for_dalle(
    provider: OpenAIProvider, mock: respx.MockRouter, model: str, options: dict[str, Any], sent: bool
) -> None:
    route = mock.post(f"{API}/images/generations").mock(return_value=images_response({"b64_json": B64}))
    await provider.run({"prompt": "x", "n": 1}, Route("openai", model, options=options), ctx())
    body = json.loads(route.calls.last.request.content)
    assert ("response_format" in body) is sent
    if sent:
        assert body["response_format"] == "b64_json"


async def test_url_outputs_and_fetch_without_key(provider: OpenAIProvider, mock: respx.MockRouter) -> None:
    blob = "https://oaidalleapiprodscus.blob.core.windows.net/private/img.png?sig=x"
    mock.post(f"{API}/images/generations").mock(return_value=images_response({"url": blob}))
    download = mock.get(blob).respond(200, content=WEBP)
    result = await provider.run({"prompt": "x", "n": 1}, Route("openai", "dall-e-3"), ctx())
    assert result.images == [ProviderImage(url=blob)]
    assert await provider.fetch(result.images[0]) == WEBP
    assert "authorization" not in download.calls.last.request.headers


OTHER = base64.b64encode(b"not an image").decode()


@pytest.mark.parametrize(
    ("output_format", "b64", "mime"),
    [("webp", OTHER, "image/webp"),  # unknown bytes: the asked format
     (None, OTHER, None),  # nothing known: sniffed from the bytes at delivery
     ("png", base64.b64encode(JPEG).decode(), "image/jpeg")],  # the bytes win over the asked format
)
async def test_b64_json_becomes_a_data_uri(
    provider: OpenAIProvider, mock: respx.MockRouter, output_format: str | None, b64: str, mime: str | None
) -> None:
    mock.post(f"{API}/images/generations").mock(return_value=images_response({"b64_json": b64}))
    payload: dict[str, Any] = {"prompt": "x"}
    if output_format is not None:
        payload["output_format"] = output_format
    result = await provider.run(payload, Route("openai", "gpt-image-1"), ctx())
    uri = f"data:{mime or 'application/octet-stream'};base64,{b64}"
    assert result.images == [ProviderImage(url=uri, content_type=mime)]


def fetch_settings(max_bytes: int) -> Settings:
    return Settings(providers=ProvidersSettings(openai=OpenAISettings(api_key=KEY)), fetch={"max_bytes": max_bytes})


class Chunks(httpx.AsyncByteStream):
    def __init__(self, size: int, count: int) -> None:
        self.chunk, self.count, self.sent = b"\0" * size, count, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.sent += 1
            yield self.chunk


@pytest.mark.parametrize("declared", [True, False])
async def test_oversized_output_is_refused_while_streaming(
    http: httpx.AsyncClient, mock: respx.MockRouter, declared: bool
) -> None:
    blob = "https://oaidalleapiprodscus.blob.core.windows.net/private/img.png?sig=x"
    body = Chunks(64 * 1024, 1024)  # 64 MiB
    headers = {"Content-Length": str(64 * 1024 * 1024)} if declared else {}
    mock.get(blob).mock(return_value=httpx.Response(200, headers=headers, stream=body))
    provider = OpenAIProvider(http, fetch_settings(1024 * 1024))
    with pytest.raises(UpstreamError, match="larger than the limit"):
        await provider.fetch(ProviderImage(url=blob))
    assert body.sent == (0 if declared else 17)


async def test_no_images_is_an_upstream_error(provider: OpenAIProvider, mock: respx.MockRouter) -> None:
    mock.post(f"{API}/images/generations").mock(return_value=images_response())
    with pytest.raises(UpstreamError):
        await provider.run({"prompt": "x", "n": 1}, Route("openai", "gpt-image-1"), ctx())


# ---- edits on the wire -------------------------------------------------------------------------


async def test_edit_is_multipart_with_repeated_image_parts(provider: OpenAIProvider, mock: respx.MockRouter) -> None:
    route = mock.post(f"{API}/images/edits").mock(return_value=images_response({"b64_json": B64}))
    request = edit(
        images=[InputImage(data=PNG, format="png"), InputImage(data=JPEG, format="jpeg")],
        mask=InputImage(data=PNG, format="png"),
        n=2,
        size="1024x1536",
        input_fidelity="high",
        output_format="jpeg",
        output_compression=80,
        extra={"stream_hint": True},
    )
    (payload,) = (await plan(provider, "gpt-image-1", request)).payloads
    await provider.run(payload, Route("openai", "gpt-image-1"), ctx("edit"))
    sent = route.calls.last.request
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")
    files = [(name, filename, ctype, data) for name, filename, ctype, data in multipart(sent) if filename]
    assert files == [
        ("image[]", "image-0.png", "image/png", PNG),
        ("image[]", "image-1.jpg", "image/jpeg", JPEG),
        ("mask", "mask.png", "image/png", PNG),
    ]
    assert fields(sent) == {
        "model": "gpt-image-1",
        "prompt": "make it blue",
        "n": "2",
        "size": "1024x1536",
        "input_fidelity": "high",
        "output_format": "jpeg",
        "output_compression": "80",
        "stream_hint": "true",
    }


async def test_dalle2_edit_sends_a_single_image_part(provider: OpenAIProvider, mock: respx.MockRouter) -> None:
    route = mock.post(f"{API}/images/edits").mock(return_value=images_response({"b64_json": B64}))
    (payload,) = (await plan(provider, "dall-e-2", edit(size="512x512"))).payloads
    await provider.run(payload, Route("openai", "dall-e-2"), ctx("edit"))
    sent = route.calls.last.request
    assert [(name, filename) for name, filename, _, _ in multipart(sent) if filename] == [("image", "image-0.png")]
    assert fields(sent)["response_format"] == "b64_json"


async def test_edit_with_url_input_uses_the_json_form(provider: OpenAIProvider, mock: respx.MockRouter) -> None:
    route = mock.post(f"{API}/images/edits").mock(return_value=images_response({"b64_json": B64}))
    request = edit(
        images=[InputImage(url="https://example.com/a.png"), InputImage(data=PNG, format="png")],
        mask=InputImage(data=PNG, format="png"),
        quality="low",
    )
    (payload,) = (await plan(provider, "gpt-image-1.5", request)).payloads
    await provider.run(payload, Route("openai", "gpt-image-1.5"), ctx("edit"))
    uri = "data:image/png;base64," + B64
    assert json.loads(route.calls.last.request.content) == {
        "model": "gpt-image-1.5",
        "prompt": "make it blue",
        "n": 1,
        "quality": "low",
        "images": [{"image_url": "https://example.com/a.png"}, {"image_url": uri}],
        "mask": {"image_url": uri},
    }


async def test_dry_run_shows_placeholders(provider: OpenAIProvider) -> None:
    refs = await provider.prepare_images(
        [InputImage(data=PNG, format="png"), InputImage(url="https://e.com/a.png")],
        Route("openai", "gpt-image-1"),
        dry_run=True,
    )
    assert refs == [f"<multipart part: image-0, image/png, {len(PNG)} bytes>", "https://e.com/a.png"]


# ---- routes and configuration ------------------------------------------------------------------


async def test_route_base_url_and_key_env(
    provider: OpenAIProvider, mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_OPENAI_KEY", "azure-key")
    route = mock.post("https://res.openai.azure.com/openai/v1/images/generations").mock(
        return_value=images_response({"b64_json": B64})
    )
    options = {"base_url": "https://res.openai.azure.com/openai/v1/", "api_key_env": "AZURE_OPENAI_KEY"}
    await provider.run({"prompt": "x", "n": 1}, Route("openai", "gpt-image-1", options=options), ctx())
    assert route.calls.last.request.headers["authorization"] == "Bearer azure-key"


async def test_missing_keys(http: httpx.AsyncClient, mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = OpenAIProvider(http, settings(api_key=None))
    with pytest.raises(ProviderNotConfigured) as info:
        provider.check_configured()
    assert info.value.message == "provider openai is not configured: set OPENAI_API_KEY"
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ProviderNotConfigured) as route_info:
        await provider.run({"prompt": "x"}, Route("openai", "m", options={"api_key_env": "NO_SUCH_KEY"}), ctx())
    assert "NO_SUCH_KEY" in route_info.value.message
    assert not mock.calls


# ---- errors ------------------------------------------------------------------------------------


def envelope(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def error_for(provider: OpenAIProvider, mock: respx.MockRouter, response: httpx.Response) -> GatewayError:
    route = mock.post(f"{API}/images/generations").mock(return_value=response)
    route.reset()  # respx reuses a route with the same pattern
    with pytest.raises(GatewayError) as info:
        await provider.run({"prompt": "x", "n": 1}, Route("openai", "gpt-image-1"), ctx())
    assert route.call_count == 1  # never retried inside the adapter
    return info.value


async def test_400_keeps_param_and_code(provider: OpenAIProvider, mock: respx.MockRouter) -> None:
    body = envelope(
        "Invalid value: '1536x1000'. Supported values are: ...", "invalid_request_error", "size", "invalid_value"
    )
    error = await error_for(provider, mock, httpx.Response(400, json=body))
    assert type(error) is InvalidRequest
    assert (error.status, error.param, error.code, error.message) == (
        400,
        "size",
        "invalid_value",
        body["error"]["message"],
    )
    error = await error_for(
        provider,
        mock,
        httpx.Response(
            400, json=envelope("Unknown parameter: 'seed'.", "invalid_request_error", "seed", "unknown_parameter")
        ),
    )
    assert (error.param, error.code) == ("seed", "unknown_parameter")


async def test_moderation_block_is_a_content_policy_violation(provider: OpenAIProvider, mock: respx.MockRouter) -> None:
    body = envelope(
        "Your request was rejected by the safety system.", "image_generation_user_error", None, "moderation_blocked"
    )
    error = await error_for(provider, mock, httpx.Response(400, json=body))
    assert type(error) is ContentPolicyViolation
    assert (error.status, error.code, error.fallback) == (400, "moderation_blocked", False)


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_errors_never_echo_the_key(provider: OpenAIProvider, mock: respx.MockRouter, status: int) -> None:
    body = envelope(f"Incorrect API key provided: {KEY[:8]}***", "invalid_request_error", None, "invalid_api_key")
    error = await error_for(provider, mock, httpx.Response(status, json=body))
    assert type(error) is UpstreamAuthFailed
    assert (error.status, error.code, error.retryable, error.fallback) == (502, "upstream_auth_failed", False, True)
    assert "sk-" not in error.message


async def test_404_model_is_an_upstream_error(provider: OpenAIProvider, mock: respx.MockRouter) -> None:
    body = envelope("The model `gpt-x` does not exist", "invalid_request_error", None, "model_not_found")
    error = await error_for(provider, mock, httpx.Response(404, json=body))
    assert type(error) is UpstreamError and (error.status, error.fallback) == (502, True)


async def test_429_rate_limit_and_quota(provider: OpenAIProvider, mock: respx.MockRouter) -> None:
    body = envelope("Rate limit reached", "requests", None, "rate_limit_exceeded")
    error = await error_for(provider, mock, httpx.Response(429, json=body, headers={"retry-after": "3"}))
    assert type(error) is RateLimited
    assert (error.status, error.retry_after, error.retryable, error.fallback) == (429, 3.0, True, True)
    body = envelope("You exceeded your current quota", "insufficient_quota", None, "insufficient_quota")
    error = await error_for(provider, mock, httpx.Response(429, json=body))
    assert type(error) is InsufficientCredit
    assert (error.status, error.retryable, error.fallback) == (402, False, True)


@pytest.mark.parametrize(
    ("status", "headers", "kind", "retryable"),
    [
        (500, {}, UpstreamError, False),
        (502, {}, UpstreamError, False),
        (500, {"x-should-retry": "true"}, UpstreamError, True),
        (503, {"retry-after": "2"}, ProviderUnavailable, True),
        (503, {"x-should-retry": "false"}, ProviderUnavailable, False),
        (429, {}, RateLimited, True),
        (429, {"x-should-retry": "false"}, RateLimited, False),  # e.g. another imagegate: the job was taken
    ],
)
async def test_5xx(
    provider: OpenAIProvider,
    mock: respx.MockRouter,
    status: int,
    headers: dict[str, str],
    kind: type[GatewayError],
    retryable: bool,
) -> None:
    body = envelope("The server had an error", "server_error", None, None)
    error = await error_for(provider, mock, httpx.Response(status, json=body, headers=headers))
    assert type(error) is kind
    assert (error.retryable, error.fallback) == (retryable, True)
    assert error.accepted is (not retryable)  # a failure the upstream may have done the work for


async def test_413_and_non_json_errors(provider: OpenAIProvider, mock: respx.MockRouter) -> None:
    error = await error_for(
        provider, mock, httpx.Response(413, json=envelope("too big", "invalid_request_error", "image", None))
    )
    assert type(error) is PayloadTooLarge and error.param == "image"
    error = await error_for(provider, mock, httpx.Response(502, text="<html>Bad gateway</html>"))
    assert type(error) is UpstreamError and "Bad Gateway" in error.message


async def test_transport_errors(provider: OpenAIProvider, mock: respx.MockRouter) -> None:
    mock.post(f"{API}/images/generations").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(UpstreamTimeout) as timeout:
        await provider.run({"prompt": "x"}, Route("openai", "gpt-image-1"), ctx())
    assert timeout.value.retryable is False  # the image may have been made (and billed)
    mock.post(f"{API}/images/generations").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(ProviderUnavailable) as refused:
        await provider.run({"prompt": "x"}, Route("openai", "gpt-image-1"), ctx())
    assert refused.value.retryable is True
