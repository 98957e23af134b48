"""The async image job: its record, its public JSON (`object: "image.job"`) and the request codec.

Statuses: `queued` -> `in_progress` -> `succeeded` | `failed` | `canceled` (a queued job may be
canceled at once; a retryable failure puts an `in_progress` job back to `queued` with a
`not_before`). The request is kept as JSON with its image bytes in base64, so a job never
depends on the client that submitted it.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from imagegate.core.request import ImageRequest, InputImage

__all__ = [
    "ACTIVE",
    "STATUSES",
    "TERMINAL",
    "Job",
    "JobStatus",
    "decode_request",
    "encode_request",
    "new_job_id",
]

JobStatus = Literal["queued", "in_progress", "succeeded", "failed", "canceled"]
STATUSES: tuple[JobStatus, ...] = ("queued", "in_progress", "succeeded", "failed", "canceled")
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
ACTIVE = frozenset({"queued", "in_progress"})
ID_PREFIX = "imgjob_"


def new_job_id() -> str:
    return ID_PREFIX + secrets.token_hex(12)


@dataclass(slots=True)
class Job:
    id: str
    key: str  # the client key's name (`anonymous` on an open gateway)
    model: str
    operation: str
    lane: str  # the provider of the model's first (or pinned) route: what max_concurrent_jobs counts
    base_url: str  # the submitting request's base URL (for `url` results)
    created_at: float
    status: JobStatus = "queued"
    seq: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    not_before: float = 0.0
    attempts: int = 0
    provider: str | None = None
    upstream_request_id: str | None = None
    handles: dict[str, dict[str, Any]] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)  # the sync call's x-imagegate-* headers
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    lease_owner: str | None = None
    lease_until: float = 0.0
    webhook_url: str | None = None
    webhook: dict[str, Any] | None = None  # {id, status, attempts: [...], next_at}
    queue_position: int | None = None  # filled in when read
    progress: dict[str, Any] | None = None  # the upstream's report while in_progress, filled in when read
    idempotency_key: str | None = None  # the submit's Idempotency-Key: the same key and request -> this job
    fingerprint: str | None = None  # of the submitted request (idempotency.codec.fingerprint)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def public(self) -> dict[str, Any]:
        """The job as clients see it (GET /v1/images/jobs/{id}, events, webhooks)."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": "image.job",
            "status": self.status,
            "model": self.model,
            "operation": self.operation,
            "created_at": int(self.created_at),
            "started_at": _int(self.started_at),
            "finished_at": _int(self.finished_at),
            "provider": self.provider,
            "upstream_request_id": self.upstream_request_id,
            "attempts": self.attempts,
            "result": self.result,
            "error": self.error,
        }
        if self.status == "queued":
            out["queue_position"] = self.queue_position
        if self.status == "in_progress" and self.progress:
            out["progress"] = dict(self.progress)
        if self.headers:
            out["headers"] = dict(self.headers)
        if self.webhook is not None:
            out["webhook"] = {k: v for k, v in self.webhook.items() if k != "next_at"}
        return out


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _image(image: InputImage) -> dict[str, Any]:
    out = dataclasses.asdict(image)
    if image.data is not None:
        out["data"] = base64.b64encode(image.data).decode("ascii")
    return out


def _input(raw: dict[str, Any]) -> InputImage:
    data = raw.get("data")
    return InputImage(**{**raw, "data": base64.b64decode(data) if data is not None else None})


def encode_request(request: ImageRequest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(request):
        value = getattr(request, f.name)
        if f.name == "images":
            value = [_image(image) for image in value]
        elif f.name == "mask":
            value = _image(value) if value is not None else None
        out[f.name] = value
    return out


def decode_request(raw: dict[str, Any]) -> ImageRequest:
    values = dict(raw)
    values["images"] = [_input(image) for image in values.get("images", [])]
    if values.get("mask") is not None:
        values["mask"] = _input(values["mask"])
    return ImageRequest(**values)
