"""What an idempotency record holds: the request's fingerprint and the response's skeleton.

The fingerprint is a SHA-256 over the *parsed* request (every field; image bytes by their own
digest), so the same request sent again matches even though its multipart boundary differs.
The skeleton is the `ImageResult` with each `b64_json` image moved to the image storage and
replaced by its storage id: a multi-megabyte response becomes a record of a few hundred bytes.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
from typing import Any

from imagegate.core.errors import GatewayError
from imagegate.core.request import FORMAT_MIME, ImageRequest, InputImage
from imagegate.core.results import ImageResult, OutputImage
from imagegate.storage.base import Storage

__all__ = ["IdempotencyResultExpired", "fingerprint", "restore", "skeleton"]

_STORED = "stored_b64_json"
_VOLATILE_HEADERS = ("x-ratelimit-", "x-imagegate-cost-usd", "idempotent-replayed")


class IdempotencyResultExpired(GatewayError):
    """409: the record lives but its stored images are gone (e.g. a storage lifecycle rule shorter
    than `idempotency.ttl_seconds`). Final (`x-should-retry: false`): running the request again
    under the same key could pay twice; the client decides, with a new key."""

    status = 409
    type = "invalid_request_error"
    code = "idempotency_result_expired"
    client_retry = False

    @property
    def extra_headers(self) -> dict[str, str]:
        return {"x-should-retry": "false"}


def _canonical(value: Any) -> Any:
    if isinstance(value, InputImage):
        body = hashlib.sha256(value.data).hexdigest() if value.data is not None else None
        return {"sha256": body, "url": value.url, "filename": value.filename}
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    return value


def fingerprint(request: ImageRequest) -> str:
    fields = {f.name: _canonical(getattr(request, f.name)) for f in dataclasses.fields(request)}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


async def skeleton(result: ImageResult, storage: Storage, *, ttl_seconds: int) -> dict[str, Any]:
    """The result as JSON, its base64 images stored in `storage` for `ttl_seconds`."""

    async def one(image: OutputImage) -> dict[str, Any]:
        out: dict[str, Any] = {"url": image.url, "revised_prompt": image.revised_prompt}
        if image.b64_json is not None:
            data = await asyncio.to_thread(base64.b64decode, image.b64_json)
            fmt = result.output_format if result.output_format in FORMAT_MIME else "png"
            out[_STORED] = await storage.put(
                data, content_type=FORMAT_MIME[fmt], extension=fmt, ttl_seconds=ttl_seconds
            )
        return out

    return {
        "created": result.created,
        "data": list(await asyncio.gather(*(one(image) for image in result.data))),
        "size": result.size,
        "output_format": result.output_format,
        "quality": result.quality,
        "background": result.background,
        "usage": result.usage,
        "headers": {k: v for k, v in result.headers.items() if not k.lower().startswith(_VOLATILE_HEADERS)},
    }


async def restore(record: dict[str, Any], storage: Storage) -> ImageResult:
    """The stored result again (base64 images read back from `storage`)."""

    async def one(item: dict[str, Any]) -> OutputImage:
        b64 = None
        if item.get(_STORED):
            stored = await storage.get(item[_STORED])
            if stored is None:
                raise IdempotencyResultExpired(
                    "The stored response of this Idempotency-Key is no longer available; "
                    "send the request again with a new Idempotency-Key to run it again.",
                    param="Idempotency-Key",
                )
            b64 = await asyncio.to_thread(lambda: base64.b64encode(stored.data).decode("ascii"))
        return OutputImage(url=item.get("url"), b64_json=b64, revised_prompt=item.get("revised_prompt"))

    return ImageResult(
        created=int(record["created"]),
        data=list(await asyncio.gather(*(one(item) for item in record["data"]))),
        size=record.get("size"),
        output_format=record["output_format"],
        quality=record["quality"],
        background=record["background"],
        headers=dict(record.get("headers", {})),
        usage=dict(record.get("usage", {})),
    )
