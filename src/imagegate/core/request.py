"""The typed, normalized request every layer after the HTTP parser works with."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Literal

from imagegate.core.errors import InvalidRequest

__all__ = [
    "FORMAT_MIME",
    "ImageRequest",
    "InputImage",
    "Operation",
    "OutputFormat",
    "ResponseFormat",
    "check_mask_size",
]

Operation = Literal["edit", "generate"]
ResponseFormat = Literal["url", "b64_json"]
OutputFormat = Literal["png", "jpeg", "webp", "gif", "avif"]

FORMAT_MIME: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "avif": "image/avif",
}


@dataclass(frozen=True, slots=True)
class InputImage:
    """One input image: bytes the gateway holds (format sniffed from the bytes), or a
    remote http(s) URL from the JSON form that providers may fetch themselves."""

    data: bytes | None = None
    url: str | None = None
    format: str | None = None  # png | jpeg | webp | gif | ... (None for an unfetched URL)
    width: int | None = None
    height: int | None = None
    filename: str | None = None

    @property
    def mime(self) -> str:
        return FORMAT_MIME.get(self.format or "", "application/octet-stream")

    def data_uri(self) -> str:
        if self.data is None:
            raise ValueError("a remote image has no bytes")
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


def check_mask_size(image: InputImage, mask: InputImage) -> None:
    """OpenAI's rule: the mask has the image's dimensions (the first image's, when several are
    sent). Checked when both sizes are known (bytes the gateway holds); 400 `invalid_value`, `mask`."""
    if None in (image.width, image.height, mask.width, mask.height):
        return
    if (mask.width, mask.height) != (image.width, image.height):
        raise InvalidRequest(
            f"Invalid mask: it is {mask.width}x{mask.height} but the image is {image.width}x{image.height}. "
            "The mask must have the same dimensions as the image (the first image, when several are given).",
            param="mask",
        )


@dataclass(slots=True)
class ImageRequest:
    """A validated OpenAI-style image request. `None` always means "not given"."""

    operation: Operation
    prompt: str
    model: str
    images: list[InputImage] = field(default_factory=list)
    mask: InputImage | None = None
    n: int = 1
    size: str | None = None
    aspect_ratio: str | None = None
    resolution: str | None = None
    response_format: ResponseFormat | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = None
    quality: str | None = None
    background: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    cfg_scale: float | None = None
    num_inference_steps: int | None = None
    user: str | None = None
    stream: bool = False
    partial_images: int | None = None
    moderation: str | None = None
    style: str | None = None
    input_fidelity: str | None = None
    # Every field the gateway does not model itself, with its (coerced) value.
    extra: dict[str, Any] = field(default_factory=dict)
    # A route pin (`x-imagegate-route`): serve on that route of the model only (see CatalogEntry.pinned).
    route: str | None = None

    def given(self) -> dict[str, Any]:
        """The OpenAI-side parameters the caller actually set (not None), extra fields included."""
        out: dict[str, Any] = {}
        for name in _SCALARS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.n != 1:
            out["n"] = self.n
        if self.stream:
            out["stream"] = True
        if self.mask is not None:
            out["mask"] = self.mask
        out.update(self.extra)
        return out


_SCALARS = (
    "size",
    "aspect_ratio",
    "resolution",
    "response_format",
    "output_format",
    "output_compression",
    "quality",
    "background",
    "negative_prompt",
    "seed",
    "cfg_scale",
    "num_inference_steps",
    "user",
    "partial_images",
    "moderation",
    "style",
    "input_fidelity",
)
