"""Image inputs of the edit parsers (`api.parsing`): one JSON `{"image_url": ...}` reference
checked, uploaded and decoded images probed in the image pool, and the errors for too many or too
large images."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from imagegate.api.fields import invalid_type
from imagegate.core import imaging
from imagegate.core.errors import GatewayError, InvalidRequest, PayloadTooLarge, UnsupportedParameter
from imagegate.core.fetch import probe_image
from imagegate.core.request import InputImage

__all__ = ["MAX_IMAGE_URL_CHARS", "file_too_large", "image_ref", "probe_many", "too_many_images"]

MAX_IMAGE_URL_CHARS = 20_971_520  # OpenAI's ImageRefParam.image_url maxLength


def image_ref(ref: Any, *, param: str, label: str, cap: int) -> InputImage | str:
    """One `{"image_url": ...}` reference, checked: a data: URI (still to decode, in the pool) or an
    unfetched URL image."""
    if not isinstance(ref, dict):
        raise invalid_type(param, 'an object like {"image_url": "..."}', ref)
    unknown = sorted(set(ref) - {"image_url", "file_id"})
    if unknown:
        raise InvalidRequest(f"Unknown parameter in {label}: '{unknown[0]}'.", param=param, code="unknown_parameter")
    url, file_id = ref.get("image_url"), ref.get("file_id")
    if (url is None) == (file_id is None):
        raise InvalidRequest(f"{label} must have exactly one of 'image_url' or 'file_id'.", param=param)
    if file_id is not None:
        raise UnsupportedParameter(
            f"{label}: 'file_id' references are not supported by this gateway; "
            "send 'image_url' with an http(s) URL or a data: URI.",
            param=param,
        )
    if not isinstance(url, str):
        raise invalid_type(param, "a string 'image_url'", url)
    if len(url) > MAX_IMAGE_URL_CHARS:
        raise InvalidRequest(f"{label}: 'image_url' is longer than {MAX_IMAGE_URL_CHARS} characters.", param=param)
    if url[:5].lower() == "data:":
        return url
    try:  # every parser that reads this URL later, so that none of them can fail after this point
        parts = urlsplit(url)
        _ = parts.port
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL):
        raise InvalidRequest(f"{label}: 'image_url' is not a valid URL.", param=param, code="invalid_url") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"{label}: 'image_url' must be an http(s) URL or a data: URI.", param=param)
    return InputImage(url=url)


# -- probing ---------------------------------------------------------------------------------------


async def probe_many(
    pool: imaging.ImagePool, items: Sequence[tuple[str, str, bytes, str | None]], *, max_pixels: int
) -> list[InputImage]:
    """Probe all images concurrently; the first failure in input order is raised."""
    results = await asyncio.gather(
        *(
            probe_image(pool, data, label=label, param=param, filename=name, max_pixels=max_pixels)
            for label, param, data, name in items
        ),
        return_exceptions=True,
    )
    images: list[InputImage] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        images.append(result)
    return images


# -- errors ----------------------------------------------------------------------------------------


def too_many_images(limit: int, given: int | None = None, *, param: str = "image") -> InvalidRequest:
    count = f"{given} images were given" if given is not None else "too many files were given"
    return InvalidRequest(
        f"Too many images: {count}; at most {limit} are allowed.", param=param, code="too_many_images"
    )


def file_too_large(param: str, filename: str | None, cap: int) -> GatewayError:
    name = f" ({filename})" if filename and filename != "upload" else ""
    return PayloadTooLarge(f"The file for '{param}'{name} is larger than the limit of {cap} bytes.", param=param)
