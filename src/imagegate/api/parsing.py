"""HTTP request -> validated `ImageRequest`: body handling here, scalar fields in `api.fields`.

Edits arrive as multipart (what both OpenAI SDKs send) or as JSON; generations as JSON.

Multipart edits
    images   `image`, then `image[]`, then `image[0]`, `image[1]`, ... (each a file part), 1..max_images
    mask     one file part
    scalars  strings, coerced per field by `api.fields.build_request`; an empty string counts as
             not given
    extras   unknown fields go to `ImageRequest.extra`: "true"/"false" -> bool, integer and decimal
             literals -> numbers, anything else stays a string; `key[sub]` -> {"key": {"sub": ...}},
             repeated `key[]` -> a list
JSON edits
    images   `[{"image_url": "<http(s) URL or data: URI>"}]`; `file_id` is not supported
    mask     `{"image_url": ...}`
    http(s) URLs are *not* fetched here (providers that accept URLs fetch them themselves); the
    service calls `core.fetch.fetch_image()` when it must hold the bytes.
Generations (JSON)
    a JSON object; an explicit `null` means "use the default", like a missing field.

Text is Unicode or a 400 naming the field (`api.text`). Image URLs are parsed here by every
parser that later reads them (`urlsplit`, `httpx.URL`): one that fails is a 400 `invalid_url`.

Uploaded and data-URI images are identified from their bytes (`core.fetch.probe_image`:
`imaging.probe(verify=True)` in the image pool), never from a declared content type: SDK raw-bytes
uploads are application/octet-stream.

Nothing heavy runs on the event loop: JSON bodies over `INLINE_JSON_BYTES` are parsed in the image
pool (small ones inline, where a thread hop would cost more than the parse), and data URIs are
decoded there too, in steps of `_B64_CHUNK` characters: `json` and `binascii` hold the GIL for a
whole call, so one big call in a worker would still stall the loop, while steps let it in between.
(One huge JSON string still costs one GIL-held scan of a few ms per MB.)

The model defaults to `DEFAULT_EDIT_MODEL` / `DEFAULT_GENERATION_MODEL` when the caller gives none;
whether the model exists is the catalog's business (404 there), not this module's.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from imagegate.api.fields import build_request, duplicate_parameter, invalid_type, json_type_name, missing_parameter
from imagegate.api.image_inputs import MAX_IMAGE_URL_CHARS
from imagegate.api.image_inputs import file_too_large as _file_too_large
from imagegate.api.image_inputs import image_ref as _image_ref
from imagegate.api.image_inputs import probe_many as _probe_many
from imagegate.api.image_inputs import too_many_images as _too_many_images
from imagegate.api.text import check_unicode, read_form
from imagegate.core import imaging
from imagegate.core.errors import InvalidRequest, UnsupportedParameter
from imagegate.core.request import ImageRequest, InputImage
from imagegate.settings import LimitsSettings

__all__ = [
    "DEFAULT_EDIT_MODEL",
    "DEFAULT_GENERATION_MODEL",
    "MAX_IMAGE_URL_CHARS",
    "build_request",
    "parse_edit_request",
    "parse_generation_request",
]

# The models used when a request names none (OpenAI's own default is a model this gateway may not
# serve). Change them here, or pass `default_model=` to the parse functions.
DEFAULT_EDIT_MODEL = "sandbox-edit"
DEFAULT_GENERATION_MODEL = "sandbox-image"

MAX_FORM_FIELDS = 256
INLINE_JSON_BYTES = 256 * 1024  # larger JSON bodies are parsed in the image pool
_B64_CHUNK = 1 << 20  # characters per step when decoding a data URI (a multiple of 4)
_INDEXED_IMAGE = re.compile(r"\Aimage\[(\d{1,4})\]\Z", re.ASCII)


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
    body = await _json_object(request, pool=pool)
    return await _parse_edit_json(body, limits=limits, pool=pool, default_model=default_model)


async def parse_generation_request(
    request: Request,
    *,
    limits: LimitsSettings,
    default_model: str = DEFAULT_GENERATION_MODEL,
    pool: imaging.ImagePool | None = None,
) -> ImageRequest:
    """`POST /v1/images/generations`: a JSON object (parsed in `pool`, when given, if it is large)."""
    body = await _json_object(request, pool=pool)
    return build_request("generate", body, limits=limits, default_model=default_model)


# -- multipart -------------------------------------------------------------------------------------


def _form_limits(limits: LimitsSettings) -> dict[str, int]:
    return {
        "max_files": limits.max_images + 2,  # + mask + one spare, so "17 images" gets our message
        "max_fields": MAX_FORM_FIELDS,
        "max_part_size": max(1024 * 1024, limits.max_prompt_chars * 4 + 4096),  # a full prompt in UTF-8
    }


async def _parse_edit_form(
    request: Request, *, limits: LimitsSettings, pool: imaging.ImagePool, default_model: str
) -> ImageRequest:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        form = await read_form(request, strict=media_type == "multipart/form-data", **_form_limits(limits))
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
            raise duplicate_parameter(key)
        else:
            scalars[key] = value
    images = plain + bracketed + [v for _, v in sorted(indexed, key=lambda t: t[0])]  # `image[0]`, `image[1]`, ...
    uploads = [_as_upload(v, "image") for v in images if v != ""]
    if not uploads:
        raise missing_parameter("image")
    if len(uploads) > limits.max_images:
        raise _too_many_images(limits.max_images, len(uploads))
    given_masks = [_as_upload(v, "mask") for v in masks if v != ""]
    if len(given_masks) > 1:
        raise duplicate_parameter("mask")
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


async def _json_object(request: Request, *, pool: imaging.ImagePool | None = None) -> dict[str, Any]:
    body = await _body(request)
    if not body or body.isspace():  # `not body.strip()`, without copying a big body
        raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        if pool is not None and len(body) > INLINE_JSON_BYTES:
            value = await pool.run(_loads, body, json.JSONDecoder(parse_constant=_reject_constant))
        else:
            value = _loads(body)
    except (ValueError, RecursionError):
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object "
            "(or, for /v1/images/edits, multipart/form-data).",
            code="invalid_json",
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object, not {json_type_name(value)}.", code="invalid_json"
        )
    if len(value) > MAX_FORM_FIELDS:  # as for multipart: every field is planned, reported and logged
        raise InvalidRequest(
            f"Too many parameters: {len(value)}; a request may have at most {MAX_FORM_FIELDS}.",
            code="too_many_parameters",
        )
    return value


async def _body(request: Request) -> bytes:
    """`await request.body()`, without its async generator and `aclosing` (a few microseconds per
    request): the same messages read, and the same state left on the request (`_body` cached, the
    stream consumed; a disconnect raises ClientDisconnect). Anything but a fresh Starlette
    `Request` (a body already read, a subclass, a Starlette whose state differs) goes through
    `request.body()`."""
    if type(request) is not Request or getattr(request, "_stream_consumed", True) or hasattr(request, "_body"):
        return await request.body()
    receive = request.receive
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        elif message["type"] == "http.disconnect":
            request._is_disconnected = True
            raise ClientDisconnect()
    request._stream_consumed = True
    body = request._body = b"".join(chunks)
    return body


def _loads(body: bytes, decoder: json.JSONDecoder | None = None) -> Any:
    """Parse, then check that all its text is Unicode (in the pool with the parse, for big bodies).

    `json.loads(body, parse_constant=_reject_constant)`, on the event loop with the one decoder
    built at import (`loads` with an argument builds a decoder and its scanner per call); a pool
    thread passes its own, as the scanner keeps per-parse state."""
    value = (decoder or _DECODER).decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    if isinstance(value, dict):
        check_unicode(value)
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


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
        raise missing_parameter("images")
    if not isinstance(refs, list):
        raise invalid_type("images", "an array of image references", refs)
    if len(refs) > limits.max_images:
        raise _too_many_images(limits.max_images, len(refs), param="images")
    # One at a time: decoding holds the GIL, so decoding several at once would only make the
    # event loop wait longer for it (and the first error in input order is the one raised).
    images: list[InputImage | bytes] = [
        await _resolve_ref(pool, ref, param="images", label=f"'images[{i}]'", cap=limits.max_image_bytes)
        for i, ref in enumerate(refs)
    ]
    mask_ref = fields.pop("mask", None)
    mask = (
        None
        if mask_ref is None
        else await _resolve_ref(pool, mask_ref, param="mask", label="'mask'", cap=limits.max_mask_bytes)
    )

    pending = [(f"'images[{i}]'", "images", d, None) for i, d in enumerate(images) if isinstance(d, bytes)]
    if isinstance(mask, bytes):
        pending.append(("'mask'", "mask", mask, None))
    probed = iter(await _probe_many(pool, pending, max_pixels=limits.max_pixels))
    inputs = [next(probed) if isinstance(d, bytes) else d for d in images]
    mask_image = next(probed) if isinstance(mask, bytes) else mask
    return build_request("edit", fields, limits=limits, default_model=default_model, images=inputs, mask=mask_image)


async def _resolve_ref(pool: imaging.ImagePool, ref: Any, *, param: str, label: str, cap: int) -> InputImage | bytes:
    """One `{"image_url": ...}` reference: the bytes of a data URI (decoded in the pool) or an
    unfetched URL image."""
    checked = _image_ref(ref, param=param, label=label, cap=cap)
    if isinstance(checked, str):
        return await pool.run(_decode_data_uri, checked, param=param, label=label, cap=cap)
    return checked


def _decode_data_uri(uri: str, *, param: str, label: str, cap: int) -> bytes:
    """In the image pool: a `data:` URI -> its bytes. Base64 may be url-safe, unpadded, or broken
    by whitespace."""
    comma = uri.find(",", 5)
    if comma < 0:
        raise InvalidRequest(f"{label}: malformed data URI (no ',').", param=param)
    is_base64 = uri[5:comma].lower().split(";")[-1] == "base64"
    length = len(uri) - comma - 1
    estimate = length * 3 // 4 if is_base64 else length // 3
    if estimate > cap:
        raise _file_too_large(param, None, cap)
    try:
        data = _b64decode_lenient(uri, comma + 1) if is_base64 else unquote_to_bytes(uri[comma + 1 :])
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{label}: the data URI is not valid base64.", param=param) from None
    if len(data) > cap:
        raise _file_too_large(param, None, cap)
    return data


def _b64decode_lenient(text: str, start: int) -> bytes:
    """`text[start:]` without whitespace, `-_` read as `+/`, padded, then strictly decoded; every
    step works on at most `_B64_CHUNK` characters at a time (see the module docstring)."""
    step = _B64_CHUNK
    compact = "".join(["".join(text[i : i + step].split()) for i in range(start, len(text), step)])
    if "-" in compact or "_" in compact:
        table = str.maketrans("-_", "+/")
        compact = "".join([compact[i : i + step].translate(table) for i in range(0, len(compact), step)])
    return _b64decode_strict(compact + "=" * (-len(compact) % 4))


def _b64decode_strict(text: str) -> bytes:
    """`base64.b64decode(text, validate=True)` for a `text` whose length is a multiple of 4, in steps.

    A step other than the last holds no `=`, so it decodes exactly as it would inside the whole
    string; the last step differs only in rejecting a leading `=` the whole string might accept.
    So every step succeeding gives the whole string's bytes; any failure is settled by decoding
    the whole string at once (its error, or the odd valid padding a step boundary cut)."""
    step = _B64_CHUNK
    if len(text) <= step:
        return base64.b64decode(text, validate=True)
    parts: list[bytes] = []
    try:
        for i in range(0, len(text), step):
            chunk = text[i : i + step]
            if i + step < len(text) and "=" in chunk:
                raise ValueError("padding before the end")
            parts.append(binascii.a2b_base64(chunk, strict_mode=True))
    except ValueError:
        return base64.b64decode(text, validate=True)
    return b"".join(parts)
