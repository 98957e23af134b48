"""HTTP request -> validated `ImageRequest`: the only place request fields are validated.

Edits arrive as multipart (what both OpenAI SDKs send) or as JSON; generations as JSON.

Multipart edits
    images   `image`, then `image[]`, then `image[0]`, `image[1]`, ... (each a file part), 1..max_images
    mask     one file part
    scalars  strings, coerced per field; an empty string counts as not given
    extras   unknown fields go to `ImageRequest.extra`: "true"/"false" -> bool, integer and decimal
             literals -> numbers, anything else stays a string; `key[sub]` -> {"key": {"sub": ...}},
             repeated `key[]` -> a list
JSON edits
    images   `[{"image_url": "<http(s) URL or data: URI>"}]`; `file_id` is not supported
    mask     `{"image_url": ...}`
    http(s) URLs are *not* fetched here (providers that accept URLs fetch them themselves); the
    service calls `materialize()` when it must hold the bytes.
Generations (JSON)
    a JSON object; an explicit `null` means "use the default", like a missing field.

Uploaded and data-URI images are identified from their bytes (`imaging.probe(verify=True)` in the
image pool), never from a declared content type: SDK raw-bytes uploads are application/octet-stream.

The model defaults to `DEFAULT_EDIT_MODEL` / `DEFAULT_GENERATION_MODEL` when the caller gives none;
whether the model exists is the catalog's business (404 there), not this module's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast
from urllib.parse import unquote_to_bytes, urlsplit

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from imagegate.core import imaging
from imagegate.core.errors import GatewayError, InvalidRequest, PayloadTooLarge, UnsupportedParameter
from imagegate.core.fetch import GuardedFetcher
from imagegate.core.request import ImageRequest, InputImage, Operation, OutputFormat, ResponseFormat
from imagegate.core.sizes import parse_aspect_ratio, parse_resolution, parse_size
from imagegate.settings import LimitsSettings

__all__ = [
    "DEFAULT_EDIT_MODEL",
    "DEFAULT_GENERATION_MODEL",
    "build_request",
    "materialize",
    "parse_edit_request",
    "parse_generation_request",
]

# The models used when a request names none (OpenAI's own default is a model this gateway may not
# serve). Change them here, or pass `default_model=` to the parse functions.
DEFAULT_EDIT_MODEL = "sandbox-edit"
DEFAULT_GENERATION_MODEL = "sandbox-image"

MAX_N = 10
MAX_FORM_FIELDS = 256
MAX_IMAGE_URL_CHARS = 20_971_520  # OpenAI's ImageRefParam.image_url maxLength
_RESPONSE_FORMATS = ("url", "b64_json")
_OUTPUT_FORMATS = ("png", "jpeg", "webp", "gif", "avif")
_BACKGROUNDS = ("transparent", "opaque", "auto")
_INT = re.compile(r"\A[+-]?\d{1,20}\Z", re.ASCII)
_FORM_INT = re.compile(r"\A-?(?:0|[1-9]\d{0,19})\Z", re.ASCII)
_FORM_FLOAT = re.compile(r"\A-?(?:0|[1-9]\d{0,19})\.\d{1,20}\Z", re.ASCII)
_INDEXED_IMAGE = re.compile(r"\Aimage\[(\d{1,4})\]\Z", re.ASCII)
_NESTED = re.compile(r"\A([^\[\]]+)((?:\[[^\[\]]*\])+)\Z")
_INDEX = re.compile(r"[0-9]{1,4}")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Fields the gateway models itself (everything else is an extra). `image`/`images`/`mask` are
# read separately.
_KNOWN = frozenset(
    {
        "prompt", "model", "n", "size", "aspect_ratio", "resolution", "response_format", "output_format",
        "output_compression", "quality", "background", "negative_prompt", "seed", "cfg_scale",
        "guidance_scale", "num_inference_steps", "user", "stream", "partial_images", "moderation",
        "style", "input_fidelity", "image", "images", "mask",
    }
)  # fmt: skip


# -- entry points --------------------------------------------------------------------------------


async def parse_edit_request(
    request: Request,
    *,
    limits: LimitsSettings,
    pool: imaging.ImagePool,
    default_model: str = DEFAULT_EDIT_MODEL,
) -> ImageRequest:
    """`POST /v1/images/edits`: multipart (or urlencoded) form, else a JSON body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _parse_edit_form(request, limits=limits, pool=pool, default_model=default_model)
    body = await _json_object(request)
    return await _parse_edit_json(body, limits=limits, pool=pool, default_model=default_model)


async def parse_generation_request(
    request: Request, *, limits: LimitsSettings, default_model: str = DEFAULT_GENERATION_MODEL
) -> ImageRequest:
    """`POST /v1/images/generations`: a JSON object."""
    body = await _json_object(request)
    return build_request("generate", body, limits=limits, default_model=default_model)


def build_request(
    operation: Operation,
    fields: Mapping[str, Any],
    *,
    limits: LimitsSettings,
    default_model: str,
    images: list[InputImage] | None = None,
    mask: InputImage | None = None,
    form: bool = False,
) -> ImageRequest:
    """Validate the scalar fields (JSON values, or strings when `form`) into an ImageRequest.

    `None` and `""` mean "not given". Unknown fields become `extra` (JSON values as they are;
    form strings coerced conservatively, `key[sub]` nested)."""
    f = _Fields(fields, form=form)
    prompt = f.string("prompt")
    if prompt is None or not prompt.strip():
        raise _missing("prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequest(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{limits.max_prompt_chars}, but got a string with length {len(prompt)} instead.",
            param="prompt",
            code="string_above_max_length",
        )
    size = f.string("size")
    if size is not None:
        parse_size(size)
        size = size.strip()
    aspect_ratio = f.string("aspect_ratio")
    if aspect_ratio is not None and aspect_ratio.strip().lower() != "auto":
        parse_aspect_ratio(aspect_ratio)
    resolution = f.string("resolution")
    if resolution is not None and resolution.strip().lower() == "auto":
        resolution = None  # "the model chooses" is what an absent resolution means
    elif resolution is not None:
        parse_resolution(resolution)
    cfg_scale = f.number("cfg_scale")
    guidance_scale = f.number("guidance_scale")
    if cfg_scale is not None and guidance_scale is not None and cfg_scale != guidance_scale:
        raise InvalidRequest(
            f"'cfg_scale' ({cfg_scale}) and its alias 'guidance_scale' ({guidance_scale}) disagree; send one of them.",
            param="guidance_scale",
        )
    request = ImageRequest(
        operation=operation,
        prompt=prompt,
        model=f.string("model") or default_model,
        images=list(images or []),
        mask=mask,
        n=f.integer("n", lo=1, hi=MAX_N) or 1,
        size=size,
        aspect_ratio=aspect_ratio,
        resolution=resolution,
        response_format=_as_response_format(f.choice("response_format", _RESPONSE_FORMATS)),
        output_format=_as_output_format(f.choice("output_format", _OUTPUT_FORMATS, aliases={"jpg": "jpeg"})),
        output_compression=f.integer("output_compression", lo=0, hi=100),
        quality=f.string("quality"),
        background=f.choice("background", _BACKGROUNDS),
        negative_prompt=f.string("negative_prompt"),
        seed=f.integer("seed"),
        cfg_scale=cfg_scale if cfg_scale is not None else guidance_scale,
        num_inference_steps=f.integer("num_inference_steps", lo=1),
        user=f.string("user"),
        stream=bool(f.boolean("stream")),
        partial_images=f.integer("partial_images", lo=0, hi=3),
        moderation=f.string("moderation"),
        style=f.string("style"),
        input_fidelity=f.string("input_fidelity"),
    )
    request.extra = f.extras()
    return request


async def materialize(
    image: InputImage,
    fetcher: GuardedFetcher,
    *,
    pool: imaging.ImagePool,
    max_pixels: int,
    param: str = "images",
) -> InputImage:
    """The bytes of a URL image (fetched through the SSRF guard, then probed like an upload).

    An image that already holds bytes is returned unchanged. The result holds bytes only
    (`url=None`), so later stages treat it as an uploaded image."""
    if image.data is not None:
        return image
    if image.url is None:
        raise ValueError("an InputImage needs data or url")
    data = await fetcher.fetch(image.url, param=param)
    name = urlsplit(image.url).path.rsplit("/", 1)[-1] or None
    label = f"'{param}' ({_host(image.url)})"
    return await _probe(pool, data, label=label, param=param, filename=name, max_pixels=max_pixels)


# -- multipart -------------------------------------------------------------------------------------


async def _parse_edit_form(
    request: Request, *, limits: LimitsSettings, pool: imaging.ImagePool, default_model: str
) -> ImageRequest:
    try:
        form = await request.form(
            max_files=limits.max_images + 2,  # + mask + one spare, so "17 images" gets our message
            max_fields=MAX_FORM_FIELDS,
            max_part_size=max(1024 * 1024, limits.max_prompt_chars * 4 + 4096),  # a full prompt in UTF-8
        )
    except (HTTPException, MultiPartException) as exc:  # Starlette wraps MultiPartException when in an app
        detail = str(exc.detail if isinstance(exc, HTTPException) else exc.message)
        if "Too many files" in detail:
            raise _too_many_images(limits.max_images) from None
        raise InvalidRequest(f"Invalid multipart body: {detail}", code="invalid_multipart") from None
    try:
        uploads, mask_upload, scalars = _split_form(form, limits)
        sources = [(f"'image[{i}]'" if len(uploads) > 1 else "'image'", "image", u) for i, u in enumerate(uploads)]
        if mask_upload is not None:
            sources.append(("'mask'", "mask", mask_upload))
        blobs = [await _read_upload(upload, param=param, limits=limits) for _, param, upload in sources]
    finally:
        await form.close()
    probed = await _probe_many(
        pool,
        [(label, param, data, upload.filename) for (label, param, upload), data in zip(sources, blobs, strict=True)],
        max_pixels=limits.max_pixels,
    )
    mask = probed.pop() if mask_upload is not None else None
    return build_request(
        "edit", scalars, limits=limits, default_model=default_model, images=probed, mask=mask, form=True
    )


def _split_form(form: FormData, limits: LimitsSettings) -> tuple[list[UploadFile], UploadFile | None, dict[str, Any]]:
    plain: list[str | UploadFile] = []  # `image`
    bracketed: list[str | UploadFile] = []  # `image[]`
    indexed: list[tuple[int, str | UploadFile]] = []
    masks: list[str | UploadFile] = []
    scalars: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in ("image", "image[]"):
            (plain if key == "image" else bracketed).append(value)
        elif m := _INDEXED_IMAGE.match(key):
            indexed.append((int(m.group(1)), value))
        elif key.startswith("image["):
            raise InvalidRequest(f"Invalid parameter name '{key}': send images as 'image' or 'image[]'.", param="image")
        elif key == "mask":
            masks.append(value)
        elif isinstance(value, UploadFile):
            raise UnsupportedParameter(f"Unsupported file parameter: '{key}'. Only 'image' and 'mask' take files.",
                                       param=key)  # fmt: skip
        elif key in scalars:
            raise _duplicate(key)
        else:
            scalars[key] = value
    images = plain + bracketed + [v for _, v in sorted(indexed, key=lambda t: t[0])]  # `image[0]`, `image[1]`, ...
    uploads = [_as_upload(v, "image") for v in images if v != ""]
    if not uploads:
        raise _missing("image")
    if len(uploads) > limits.max_images:
        raise _too_many_images(limits.max_images, len(uploads))
    given_masks = [_as_upload(v, "mask") for v in masks if v != ""]
    if len(given_masks) > 1:
        raise _duplicate("mask")
    return uploads, (given_masks[0] if given_masks else None), scalars


def _as_upload(value: str | UploadFile, param: str) -> UploadFile:
    if isinstance(value, UploadFile):
        return value
    expected = "an array of files or a file" if param == "image" else "a file"
    raise InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got a string instead. "
        "Send it as a file part (multipart/form-data with a filename).",
        param=param,
        code="invalid_type",
    )


async def _read_upload(upload: UploadFile, *, param: str, limits: LimitsSettings) -> bytes:
    cap = limits.max_mask_bytes if param == "mask" else limits.max_image_bytes
    if upload.size is not None and upload.size > cap:
        raise _file_too_large(param, upload.filename, cap)
    data = await upload.read()
    if len(data) > cap:
        raise _file_too_large(param, upload.filename, cap)
    return data


# -- JSON ------------------------------------------------------------------------------------------


async def _json_object(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object "
            "(or, for /v1/images/edits, multipart/form-data).",
            code="invalid_json",
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not {_json_type(value)}.", code="invalid_json")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _parse_edit_json(
    body: dict[str, Any], *, limits: LimitsSettings, pool: imaging.ImagePool, default_model: str
) -> ImageRequest:
    fields = {k: v for k, v in body.items() if v is not None}
    if "image" in fields:
        raise InvalidRequest(
            'In a JSON body, images go in \'images\': [{"image_url": "https://... or data:..."}]. '
            "File uploads ('image') need multipart/form-data.",
            param="image",
        )
    refs = fields.pop("images", None)
    if refs is None or refs == []:
        raise _missing("images")
    if not isinstance(refs, list):
        raise _type_error("images", "an array of image references", refs)
    if len(refs) > limits.max_images:
        raise _too_many_images(limits.max_images, len(refs), param="images")
    images: list[InputImage | bytes] = [
        _image_ref(ref, param="images", label=f"'images[{i}]'", cap=limits.max_image_bytes)
        for i, ref in enumerate(refs)
    ]
    mask_ref = fields.pop("mask", None)
    mask = None if mask_ref is None else _image_ref(mask_ref, param="mask", label="'mask'", cap=limits.max_mask_bytes)

    pending = [(f"'images[{i}]'", "images", d, None) for i, d in enumerate(images) if isinstance(d, bytes)]
    if isinstance(mask, bytes):
        pending.append(("'mask'", "mask", mask, None))
    probed = iter(await _probe_many(pool, pending, max_pixels=limits.max_pixels))
    inputs = [next(probed) if isinstance(d, bytes) else d for d in images]
    mask_image = next(probed) if isinstance(mask, bytes) else mask
    return build_request("edit", fields, limits=limits, default_model=default_model, images=inputs, mask=mask_image)


def _image_ref(ref: Any, *, param: str, label: str, cap: int) -> InputImage | bytes:
    """One `{"image_url": ...}` reference: decoded bytes (data: URI) or an unfetched URL image."""
    if not isinstance(ref, dict):
        raise _type_error(param, 'an object like {"image_url": "..."}', ref)
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
        raise _type_error(param, "a string 'image_url'", url)
    if len(url) > MAX_IMAGE_URL_CHARS:
        raise InvalidRequest(f"{label}: 'image_url' is longer than {MAX_IMAGE_URL_CHARS} characters.", param=param)
    if url[:5].lower() == "data:":
        return _decode_data_uri(url, param=param, label=label, cap=cap)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https") or not urlsplit(url).hostname:
        raise InvalidRequest(f"{label}: 'image_url' must be an http(s) URL or a data: URI.", param=param)
    return InputImage(url=url)


def _decode_data_uri(uri: str, *, param: str, label: str, cap: int) -> bytes:
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise InvalidRequest(f"{label}: malformed data URI (no ',').", param=param)
    is_base64 = header.lower().split(";")[-1] == "base64"
    estimate = len(payload) * 3 // 4 if is_base64 else len(payload) // 3
    if estimate > cap:
        raise _file_too_large(param, None, cap)
    try:
        if is_base64:
            compact = "".join(payload.split())
            if "-" in compact or "_" in compact:
                compact = compact.translate(str.maketrans("-_", "+/"))
            data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{label}: the data URI is not valid base64.", param=param) from None
    if len(data) > cap:
        raise _file_too_large(param, None, cap)
    return data


# -- probing ---------------------------------------------------------------------------------------


async def _probe_many(
    pool: imaging.ImagePool, items: Sequence[tuple[str, str, bytes, str | None]], *, max_pixels: int
) -> list[InputImage]:
    """Probe all images concurrently; the first failure in input order is raised."""
    results = await asyncio.gather(
        *(
            _probe(pool, data, label=label, param=param, filename=name, max_pixels=max_pixels)
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


async def _probe(
    pool: imaging.ImagePool, data: bytes, *, label: str, param: str, filename: str | None, max_pixels: int
) -> InputImage:
    shown = f"{label} ({filename})" if filename and filename != "upload" else label
    if not data:
        raise InvalidRequest(f"Invalid image {shown}: the file is empty (0 bytes).", param=param, code="invalid_image")
    try:
        info = await pool.run(imaging.probe, data, max_pixels=max_pixels, verify=True)
    except imaging.TooManyPixels as exc:
        raise InvalidRequest(
            f"Invalid image {shown}: it has too many pixels ({_ADDRESS.sub('', exc.reason)}). "
            f"The limit is {max_pixels} pixels per image.",
            param=param,
            code="image_too_large",
        ) from None
    except imaging.ImageError as exc:
        raise InvalidRequest(
            f"Invalid image {shown}: {_ADDRESS.sub('', exc.reason)}. Supported formats: PNG, JPEG, WebP, GIF, AVIF.",
            param=param,
            code="invalid_image",
        ) from None
    return InputImage(data=data, format=info.format, width=info.width, height=info.height, filename=filename)


# -- scalar fields ---------------------------------------------------------------------------------


class _Fields:
    """Takes fields out of a mapping, coercing and validating; what is left becomes `extra`."""

    def __init__(self, raw: Mapping[str, Any], *, form: bool) -> None:
        self._form = form
        self._raw: dict[str, Any] = {}
        self._nested: dict[str, Any] = {}
        for key, value in raw.items():
            if value is None or value == "":
                continue
            m = _NESTED.match(key) if form else None
            if m is None:
                self._raw[key] = value
                continue
            if m.group(1) in _KNOWN:
                raise _type_error(m.group(1), "a single value", {})
            path = re.findall(r"\[([^\[\]]*)\]", m.group(2))
            _set_nested(self._nested, key, m.group(1), path, _coerce_form(value))

    def _take(self, name: str) -> Any:
        return self._raw.pop(name, None)

    def string(self, name: str) -> str | None:
        value = self._take(name)
        if value is not None and not isinstance(value, str):
            raise _type_error(name, "a string", value)
        return value

    def integer(self, name: str, *, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self._take(name)
        if value is None:
            return None
        if isinstance(value, str) and _INT.match(value.strip()):
            number = int(value.strip())
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        else:
            raise _type_error(name, "an integer", value)
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else (
                f"at least {lo}" if lo is not None else f"at most {hi}")  # fmt: skip
            raise InvalidRequest(f"Invalid value: {number}. '{name}' must be {bounds}.", param=name)
        return number

    def number(self, name: str) -> float | None:
        value = self._take(name)
        if value is None:
            return None
        try:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError
            number = float(value)
        except ValueError:
            raise _type_error(name, "a number", value) from None
        if not math.isfinite(number):
            raise InvalidRequest(f"Invalid value: '{value}'. '{name}' must be a finite number.", param=name)
        return number

    def boolean(self, name: str) -> bool | None:
        value = self._take(name)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0"):
            return False
        raise _type_error(name, "a boolean ('true' or 'false')", value)

    def choice(self, name: str, allowed: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str | None:
        value = self.string(name)
        if value is None:
            return None
        key = value.strip().lower()
        key = (aliases or {}).get(key, key)
        if key not in allowed:
            listed = ", ".join(f"'{a}'" for a in allowed[:-1]) + f" and '{allowed[-1]}'"
            raise InvalidRequest(f"Invalid value: '{value}'. Supported values are: {listed}.", param=name)
        return key

    def extras(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self._raw.items():
            out[key] = _coerce_form(value) if self._form else value
        for key, value in self._nested.items():
            if key in out:
                raise _duplicate(key)
            out[key] = _listify(value)
        return out


def _coerce_form(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if _FORM_INT.match(value):
        return int(value)
    if _FORM_FLOAT.match(value):
        return float(value)
    return value


def _set_nested(target: dict[str, Any], name: str, key: str, path: list[str], value: Any) -> None:
    """Place `value` of the form field `name` (= `key[path0][path1]...`) into `target`."""
    if "" in path[:-1]:
        raise InvalidRequest(f"Unsupported parameter name '{name}': '[]' may only come last.", param=key)
    append = path[-1] == ""
    keys = [key, *(path[:-1] if append else path)]
    node = target
    for part in keys[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _duplicate(key)
        node = child
    last = keys[-1]
    if append:
        items = node.setdefault(last, [])
        if not isinstance(items, list):
            raise _duplicate(key)
        items.append(value)
    elif last in node:
        raise _duplicate(key)
    else:
        node[last] = value


def _listify(value: Any) -> Any:
    """`{"0": a, "1": b}` (from `key[0]`, `key[1]`) -> `[a, b]`; recursively."""
    if isinstance(value, list):
        return [_listify(v) for v in value]
    if not isinstance(value, dict):
        return value
    items = {k: _listify(v) for k, v in value.items()}
    if items and all(_INDEX.fullmatch(k) for k in items) and sorted(map(int, items)) == list(range(len(items))):
        return [items[str(i)] for i in range(len(items))]
    return items


def _as_response_format(value: str | None) -> ResponseFormat | None:
    return cast("ResponseFormat | None", value)  # already checked against _RESPONSE_FORMATS


def _as_output_format(value: str | None) -> OutputFormat | None:
    return cast("OutputFormat | None", value)  # already checked against _OUTPUT_FORMATS


# -- errors ----------------------------------------------------------------------------------------


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def _duplicate(param: str) -> InvalidRequest:
    return InvalidRequest(
        f"Duplicate parameter: '{param}'. You provided multiple values for this parameter, "
        "whereas only one is allowed.",
        param=param,
        code="duplicate_parameter",
    )


def _too_many_images(limit: int, given: int | None = None, *, param: str = "image") -> InvalidRequest:
    count = f"{given} images were given" if given is not None else "too many files were given"
    return InvalidRequest(
        f"Too many images: {count}; at most {limit} are allowed.", param=param, code="too_many_images"
    )


def _file_too_large(param: str, filename: str | None, cap: int) -> GatewayError:
    name = f" ({filename})" if filename and filename != "upload" else ""
    return PayloadTooLarge(f"The file for '{param}'{name} is larger than the limit of {cap} bytes.", param=param)


def _type_error(param: str, expected: str, value: Any) -> InvalidRequest:
    shown = f"'{value}'" if isinstance(value, str) else _json_type(value)
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {shown} instead.", param=param, code="invalid_type"
    )


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else "null"


def _host(url: str) -> str:
    return urlsplit(url).hostname or "?"
