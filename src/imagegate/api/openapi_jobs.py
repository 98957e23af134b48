"""The async job operations of the OpenAPI document (`api.openapi` merges them in):

    POST /v1/images/edits|generations  + `prefer: respond-async` -> 202 `ImageJob` (+ `location`)
    GET  /v1/images/jobs                     `ImageJobList` (`limit`, `after`, `status`)
    GET  /v1/images/jobs/{job_id}            `ImageJob`
    POST /v1/images/jobs/{job_id}/cancel     `ImageJob`
    GET  /v1/images/jobs/{job_id}/events     text/event-stream of `ImageJob` frames
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from imagegate.jobs.model import STATUSES

__all__ = ["PREFER_PARAMETER", "accepted_response", "job_components", "job_paths"]

Schema = dict[str, Any]
ErrorsOf = Callable[..., dict[str, Schema]]

_STR = {"type": "string"}
_NULL_STR = {"type": ["string", "null"]}
_NULL_INT = {"type": ["integer", "null"]}
_JOB = {"$ref": "#/components/schemas/ImageJob"}
_REQUEST_ID = {"x-request-id": {"$ref": "#/components/headers/RequestId"}}

PREFER_PARAMETER: Schema = {
    "name": "prefer",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "enum": ["respond-async"]},
    "description": "`respond-async`: store the request as an async job and answer 202 at once.",
}


def accepted_response() -> Schema:
    return {
        "description": "With `prefer: respond-async`: the job, queued (`location` is its URL).",
        "headers": {**_REQUEST_ID, "location": {"schema": _STR}},
        "content": {"application/json": {"schema": _JOB}},
    }


def _ok(description: str, schema: Schema) -> Schema:
    content = {"application/json": {"schema": schema}}
    return {"description": description, "headers": dict(_REQUEST_ID), "content": content}


def job_components() -> Schema:
    nullable_result = {"oneOf": [{"$ref": "#/components/schemas/ImagesResponse"}, {"type": "null"}]}
    nullable_error = {"oneOf": [{"$ref": "#/components/schemas/Error"}, {"type": "null"}]}
    job = {
        "type": "object",
        "additionalProperties": True,
        "required": ["id", "object", "status", "model", "created_at"],
        "properties": {
            "id": {"type": "string", "pattern": "^imgjob_"},
            "object": {"const": "image.job"},
            "status": {"enum": list(STATUSES)},
            "model": _STR,
            "operation": {"enum": ["edit", "generate"]},
            "created_at": {"type": "integer"},
            "started_at": _NULL_INT,
            "finished_at": _NULL_INT,
            "provider": _NULL_STR,
            "upstream_request_id": _NULL_STR,
            "attempts": {"type": "integer", "minimum": 0},
            "queue_position": _NULL_INT,
            "progress": {
                "type": "object",
                "additionalProperties": False,
                "description": "While in progress, the provider's report where it gives one (fal): its status, "
                "the position in its queue and the last log lines (redacted).",
                "properties": {
                    "status": _NULL_STR,
                    "queue_position": _NULL_INT,
                    "logs": {"type": "array", "items": _STR, "maxItems": 5},
                },
            },
            "result": nullable_result,
            "error": nullable_error,
            "headers": {"type": "object", "additionalProperties": _STR},
            "webhook": {"type": "object", "additionalProperties": True},
        },
        "description": "An async image job (README \"Async image jobs\").",
    }
    page = {
        "type": "object",
        "additionalProperties": False,
        "required": ["object", "data", "first_id", "last_id", "has_more"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _JOB},
            "first_id": _NULL_STR,
            "last_id": _NULL_STR,
            "has_more": {"type": "boolean"},
        },
    }
    return {"ImageJob": job, "ImageJobList": page}


def job_paths(errors: ErrorsOf) -> Schema:
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": _STR}
    listing = [
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
        {"name": "after", "in": "query", "required": False, "schema": _STR},
        {"name": "status", "in": "query", "required": False, "schema": {"enum": list(STATUSES)}},
    ]
    events = {
        "description": "Server-sent events: the job now, then one event per change (`queued`, `in_progress`), "
        "then `succeeded`, `failed` or `canceled`; each event's data is the whole job.",
        "headers": dict(_REQUEST_ID),
        "content": {"text/event-stream": {"schema": _STR}},
    }
    return {
        "/v1/images/jobs": {
            "get": {"operationId": "listImageJobs", "tags": ["jobs"], "summary": "The calling key's jobs, newest first",
                    "parameters": listing,
                    "responses": {"200": _ok("A page of jobs.", {"$ref": "#/components/schemas/ImageJobList"}),
                                  **errors(400, 401, 429, 500, 503)}}
        },
        "/v1/images/jobs/{job_id}": {
            "get": {"operationId": "retrieveImageJob", "tags": ["jobs"], "summary": "One job",
                    "parameters": [job_id],
                    "responses": {"200": _ok("The job.", _JOB), **errors(401, 404, 429, 500, 503)}}
        },
        "/v1/images/jobs/{job_id}/cancel": {
            "post": {"operationId": "cancelImageJob", "tags": ["jobs"], "summary": "Cancel a job (upstream too)",
                     "parameters": [job_id],
                     "responses": {"200": _ok("The job after the cancel.", _JOB), **errors(401, 404, 429, 500, 503)}}
        },
        "/v1/images/jobs/{job_id}/events": {
            "get": {"operationId": "imageJobEvents", "tags": ["jobs"], "summary": "Follow a job",
                    "parameters": [job_id],
                    "responses": {"200": events, **errors(401, 404, 429, 500, 503)}}
        },
    }  # fmt: skip
