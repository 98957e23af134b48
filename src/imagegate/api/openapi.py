"""The OpenAPI document at `/openapi.json`: what the wire really carries.

FastAPI cannot see the image endpoints' bodies (they are parsed by hand in `api.parsing`), so this
module writes those operations itself, from the same field list `api.fields` validates:

    POST /v1/images/edits         multipart/form-data (`image`, `image[]`, `mask` files + fields)
                                  or application/json (`images: [{"image_url"}]`, `mask`)
    POST /v1/images/generations   application/json
        200  application/json `ImagesResponse` (or `DryRunResponse` for a dry run), or
             text/event-stream carrying `ImageEditCompletedEvent` / `ImageGenerationCompletedEvent`
             / `ErrorEvent` frames when `stream` is true
    GET  /v1/models, /v1/models/{model_id}, /v1/files/images/{image_id}, /healthz, /readyz
    the async job operations (`api.openapi_jobs`): 202 on the image routes, /v1/images/jobs...

Every operation lists the statuses the gateway really answers with, each with OpenAI's error
envelope (`ErrorResponse`): the image routes 400 401 402 403 404 409 413 429 500 502 503 504; the
others what their handler and the request middleware can produce. Routes this module does not
describe keep FastAPI's generated description, with its automatic 422 (which never happens:
validation errors are 400) replaced by 400, and the envelope for 500 (and 401 / 503 under /v1/).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from imagegate import __version__
from imagegate.api.fields import MAX_N
from imagegate.api.openapi_jobs import PREFER_PARAMETER, accepted_response, job_components, job_paths
from imagegate.api.parsing import MAX_IMAGE_URL_CHARS

__all__ = ["IMAGE_FIELDS", "build_openapi", "install"]

Schema = dict[str, Any]

_ERROR_TEXT = {
    400: "Invalid request: the envelope's `param` names the field (`invalid_value`, `missing_required_parameter`, "
    "`unsupported_parameter`, `invalid_image`, `content_policy_violation`, ...).",
    401: "Missing or unknown client key (`invalid_api_key`), when client keys are configured.",
    402: "The upstream provider's account has no credit (`insufficient_credit`).",
    403: "The client key may not use this model.",
    404: "Unknown model (`model_not_found`), route or file (`not_found`).",
    409: "A conflicting request (e.g. an idempotency key reused with another body).",
    413: "The body, an image or the mask is larger than its limit (`payload_too_large`).",
    429: "Rate limited, here or upstream (`rate_limit_exceeded`); see `retry-after`.",
    500: "An unexpected error (`internal_error`); the detail is in the server log, never in the response.",
    502: "The upstream provider failed (`upstream_error`, `upstream_auth_failed`).",
    503: "Busy (`server_busy`, see `retry-after`), a provider unavailable or not configured, or not ready.",
    504: "The upstream provider did not answer in time (`upstream_timeout`).",
}
_IMAGE_ERRORS = (400, 401, 402, 403, 404, 409, 413, 429, 500, 502, 503, 504)

_STR = {"type": "string"}
_NULL_STR = {"type": ["string", "null"]}
_BINARY = {"type": "string", "format": "binary"}

#: The scalar fields of both image endpoints (`api.fields.build_request`), as JSON Schema.
IMAGE_FIELDS: dict[str, Schema] = {
    "prompt": {"type": "string", "minLength": 1, "description": "What to draw or change (required)."},
    "model": {**_NULL_STR, "description": "A model id from GET /v1/models (default: the sandbox model)."},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_N},
    "size": {**_NULL_STR, "description": "`WxH` (1-14142 px per side), `W:H`, or `auto`.", "examples": ["64x64"]},
    "aspect_ratio": {**_NULL_STR, "description": "`W:H`, e.g. `16:9`, or `auto`."},
    "resolution": {**_NULL_STR, "description": "`0.5K`, `1K`, `2K`, `4K`, megapixels such as `0.25`, or `auto`."},
    "response_format": {"enum": ["url", "b64_json", None]},
    "output_format": {"enum": ["png", "jpeg", "jpg", "webp", "gif", "avif", None]},
    "output_compression": {"type": ["integer", "null"], "minimum": 0, "maximum": 100},
    "quality": _NULL_STR,
    "background": {"enum": ["transparent", "opaque", "auto", None]},
    "negative_prompt": _NULL_STR,
    "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**63 - 1},
    "cfg_scale": {"type": ["number", "null"], "description": "Alias: `guidance_scale`."},
    "guidance_scale": {"type": ["number", "null"]},
    "num_inference_steps": {"type": ["integer", "null"], "minimum": 1},
    "user": _NULL_STR,
    "stream": {"type": ["boolean", "null"], "description": "Answer with text/event-stream events."},
    "partial_images": {"type": ["integer", "null"], "minimum": 0, "maximum": 3},
    "moderation": _NULL_STR,
    "style": _NULL_STR,
    "input_fidelity": _NULL_STR,
}
_EXTRAS = "Other fields go to the model's parameter table: passed to the provider, ignored with a reason, or a 400."


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_response(status: int) -> Schema:
    response: Schema = {
        "description": _ERROR_TEXT.get(status, "An error."),
        "headers": {"x-request-id": {"$ref": "#/components/headers/RequestId"}},
        "content": {"application/json": {"schema": _ref("ErrorResponse")}},
    }
    if status in (429, 503):
        response["headers"]["retry-after"] = {"$ref": "#/components/headers/RetryAfter"}
    return response


def _errors(*statuses: int) -> dict[str, Schema]:
    return {str(status): _error_response(status) for status in statuses}


def _json_ok(description: str, schema: Schema) -> Schema:
    return {
        "description": description,
        "headers": {"x-request-id": {"$ref": "#/components/headers/RequestId"}},
        "content": {"application/json": {"schema": schema}},
    }


def _image_operation(operation_id: str, summary: str, body: Schema, event: str) -> Schema:
    ok = _json_ok(
        "The images (`ImagesResponse`), a dry run's plan (`DryRunResponse`), or with `stream: true` an "
        f"event stream: `: keepalive` comments, then one `{event}` event per image, or one `error` event.",
        {"oneOf": [_ref("ImagesResponse"), _ref("DryRunResponse")]},
    )
    events = [_sse(event, _EVENT_SCHEMAS[event]), _sse("error", "ErrorEvent")]
    ok["content"]["text/event-stream"] = {"schema": {"oneOf": events}}
    for name in ("params", "provider", "upstream-model", "upstream-request-id", "cost-usd"):
        ok["headers"][f"x-imagegate-{name}"] = {"schema": _STR}
    return {
        "operationId": operation_id,
        "summary": summary,
        "tags": ["images"],
        "parameters": [
            {
                "name": "x-imagegate-dry-run",
                "in": "header",
                "required": False,
                "schema": _STR,
                "description": "`1` (or true/yes/on): return the provider payloads instead of calling it.",
            },
            {
                "name": "dry_run",
                "in": "query",
                "required": False,
                "schema": _STR,
                "description": "The same as the `x-imagegate-dry-run` header.",
            },
            PREFER_PARAMETER,
        ],
        "requestBody": {"required": True, "content": body},
        "responses": {"200": ok, "202": accepted_response(), **_errors(*_IMAGE_ERRORS)},
    }


_EVENT_SCHEMAS = {
    "image_edit.completed": "ImageEditCompletedEvent",
    "image_generation.completed": "ImageGenerationCompletedEvent",
}


def _sse(event: str, payload: str) -> Schema:
    """One server-sent event (`event:` + a one-line JSON `data:`); the schema covers each event."""
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": _ref(payload)}
    return _object({"event": {"const": event}, "data": data}, ["event", "data"], extra=True)


def _object(properties: Schema, required: list[str], *, extra: bool = False, description: str = "") -> Schema:
    schema: Schema = {"type": "object", "properties": properties, "required": required}
    schema["additionalProperties"] = extra
    if description:
        schema["description"] = description
    return schema


def _components() -> Schema:
    usage = _object(
        {
            "total_tokens": {"type": "integer"},
            "input_tokens": {"type": "integer"},
            "output_tokens": {"type": "integer"},
            "input_tokens_details": _object({"text_tokens": {"type": "integer"}, "image_tokens": {"type": "integer"}},
                                            ["text_tokens", "image_tokens"]),
            "output_tokens_details": _object({"image_tokens": {"type": "integer"}, "text_tokens": {"type": "integer"}},
                                             ["image_tokens", "text_tokens"]),
            "images": {"type": "integer", "minimum": 0, "description": "Images produced (fan-out included)."},
            "megapixels": {"type": "number", "minimum": 0, "description": "Their megapixels."},
        },
        ["total_tokens", "input_tokens", "output_tokens", "input_tokens_details"],
        extra=True,
    )  # fmt: skip
    image_ref = _object(
        {"image_url": {"type": "string", "maxLength": MAX_IMAGE_URL_CHARS}, "file_id": _STR},
        [],
        description="Exactly one of `image_url` (an http(s) URL or a data: URI) or `file_id` (not supported: 400).",
    )
    event = {
        "type": _STR,
        "b64_json": _STR,
        "created_at": {"type": "integer"},
        "size": _STR,
        "quality": _STR,
        "background": _STR,
        "output_format": _STR,
        "usage": _ref("Usage"),
    }
    required_event = ["type", "b64_json", "created_at", "size", "quality", "background", "output_format", "usage"]
    return {
        "schemas": {
            "Error": _object(
                {"message": _STR, "type": _STR, "param": _NULL_STR, "code": _NULL_STR},
                ["message", "type", "param", "code"],
            ),
            "ErrorResponse": _object({"error": _ref("Error")}, ["error"]),
            "ErrorEvent": _object({"error": _ref("Error")}, ["error"], description="The data of `event: error`."),
            "Usage": usage,
            "Image": _object({"url": _STR, "b64_json": _STR, "revised_prompt": _STR}, []),
            "ImagesResponse": _object(
                {
                    "created": {"type": "integer"},
                    "data": {"type": "array", "items": _ref("Image")},
                    "background": {"enum": ["transparent", "opaque"]},
                    "output_format": {"enum": ["png", "jpeg", "webp", "gif", "avif"]},
                    "quality": _STR,
                    "size": _STR,
                    "usage": _ref("Usage"),
                },
                ["created", "data"],
            ),
            "DryRunResponse": _object(
                {
                    "object": {"const": "imagegate.dry_run"},
                    "model": _STR,
                    "provider": _STR,
                    "upstream_model": _STR,
                    "payloads": {"type": "array", "items": {"type": "object"}},
                    "params": {"type": "object", "additionalProperties": _STR},
                    "notes": {"type": "object", "additionalProperties": _STR},
                    "target_size": _NULL_STR,
                },
                ["object", "model", "provider", "upstream_model", "payloads", "params"],
            ),
            "ImageEditCompletedEvent": _object(event, required_event),
            "ImageGenerationCompletedEvent": _object(event, required_event),
            "ImageRef": image_ref,
            "CreateImageRequest": _object(IMAGE_FIELDS, ["prompt"], extra=True, description=_EXTRAS),
            "CreateImageEditJsonRequest": _object(
                {
                    "images": {"type": "array", "items": _ref("ImageRef"), "minItems": 1, "maxItems": 16},
                    "mask": {"anyOf": [_ref("ImageRef"), {"type": "null"}]},
                    **IMAGE_FIELDS,
                },
                ["prompt", "images"],
                extra=True,
                description=_EXTRAS,
            ),
            "CreateImageEditRequest": _object(
                {
                    "image": {**_BINARY, "description": "An image file; repeat the part for several images."},
                    "image[]": {"type": "array", "items": _BINARY, "maxItems": 16},
                    "mask": _BINARY,
                    **{name: _form_field(schema) for name, schema in IMAGE_FIELDS.items()},
                },
                ["prompt"],
                extra=True,
                description="The images as `image`, repeated `image[]` or `image[0]`, `image[1]`, ... "
                "(1-16 files). " + _EXTRAS,
            ),
            "Model": _object(
                {"id": _STR, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": _STR},
                ["id", "object", "created", "owned_by"],
            ),
            "ModelList": _object(
                {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}, ["object", "data"]
            ),
        },
        "headers": {
            "RequestId": {"schema": _STR, "description": "The request's id (also in the server log)."},
            "RetryAfter": {"schema": _STR, "description": "Seconds to wait before retrying."},
        },
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "A client key, when keys are configured."},
            "api-key": {"type": "apiKey", "in": "header", "name": "api-key"},
        },
    }


def _form_field(schema: Schema) -> Schema:
    """A field as a multipart part: the same constraints, without `null` (a part is never null)."""
    out = dict(schema)
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        out["type"] = kinds[0] if len(kinds) == 1 else kinds
    if "enum" in schema:
        out["enum"] = [v for v in schema["enum"] if v is not None]
    return out


def _paths() -> Schema:
    edit_body = {
        "multipart/form-data": {
            "schema": _ref("CreateImageEditRequest"),
            "encoding": {"image": {"contentType": "image/*, application/octet-stream"}},
        },
        "application/json": {"schema": _ref("CreateImageEditJsonRequest")},
    }
    generate_body = {"application/json": {"schema": _ref("CreateImageRequest")}}
    model_id = {"name": "model_id", "in": "path", "required": True, "schema": _STR}
    image_id = {"name": "image_id", "in": "path", "required": True, "schema": _STR}
    image_types = {t: {"schema": _BINARY} for t in ("image/png", "image/jpeg", "image/webp", "image/gif", "image/avif")}
    return {
        "/v1/images/edits": {
            "post": _image_operation("createImageEdit", "Edit images", edit_body, "image_edit.completed")
        },
        "/v1/images/generations": {
            "post": _image_operation("createImage", "Generate images", generate_body, "image_generation.completed")
        },
        "/v1/models": {
            "get": {"operationId": "listModels", "tags": ["models"], "summary": "The catalog",
                    "responses": {"200": _json_ok("The models.", _ref("ModelList")), **_errors(401, 429, 500)}}
        },
        "/v1/models/{model_id}": {
            "get": {"operationId": "retrieveModel", "tags": ["models"], "summary": "One model",
                    "parameters": [model_id],
                    "responses": {"200": _json_ok("The model.", _ref("Model")), **_errors(401, 403, 404, 429, 500)}}
        },
        "/v1/files/images/{image_id}": {
            "get": {"operationId": "getImageFile", "tags": ["files"], "summary": "A rehosted output image",
                    "parameters": [image_id],
                    "responses": {"200": {"description": "The image bytes (`cache-control: private, max-age=...`).",
                                          "content": image_types},
                                  **_errors(404, 500)}}
        },
        "/healthz": {
            "get": {"operationId": "healthz", "tags": ["health"], "summary": "Liveness",
                    "responses": {"200": _json_ok("Alive.", _object({"status": {"const": "ok"}}, ["status"])),
                                  **_errors(500)}}
        },
        "/readyz": {
            "get": {"operationId": "readyz", "tags": ["health"], "summary": "Readiness",
                    "responses": {"200": _json_ok("Ready.", _object({"status": {"const": "ready"},
                                                                     "models": {"type": "integer"}},
                                                                    ["status", "models"], extra=True)),
                                  **_errors(500, 503)}}
        },
    }  # fmt: skip


def build_openapi(app: FastAPI) -> Schema:
    """FastAPI's document for every route, with the operations above written over it."""
    document = get_openapi(title=app.title, version=__version__, routes=app.routes, description=_DESCRIPTION)
    paths: Schema = document.setdefault("paths", {})
    for path, operations in paths.items():  # routes described by FastAPI: 400 (never 422) and the envelope
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", _error_response(400))
            statuses = (401, 500, 503) if path.startswith("/v1/") else (500,)  # a client key, a failure
            for status in statuses:
                responses.setdefault(str(status), _error_response(status))
    for path, operations in {**_paths(), **job_paths(_errors)}.items():
        paths.setdefault(path, {}).update(operations)
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    mine = _components()
    schemas.update(mine["schemas"])
    schemas.update(job_components())
    components.setdefault("headers", {}).update(mine["headers"])
    components.setdefault("securitySchemes", {}).update(mine["securitySchemes"])
    document["security"] = [{}, {"bearer": []}, {"api-key": []}]
    return document


_DESCRIPTION = (
    "An OpenAI-compatible image gateway. Errors always use OpenAI's envelope "
    '`{"error": {"message", "type", "param", "code"}}`; every response carries `x-request-id`.'
)


def install(app: FastAPI) -> None:
    """Serve this document at `/openapi.json` (built once, on first use)."""

    def openapi() -> Schema:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
