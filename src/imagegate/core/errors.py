"""The gateway's error tree. Every failure a client can see is one of these.

    GatewayError                      (status, type, code, param; rendered as OpenAI's envelope)
    ├── InvalidRequest                400 invalid_request_error          (names the `param`)
    │   ├── UnsupportedParameter      400 code=unsupported_parameter     (a table rejected it)
    │   └── ContentPolicyViolation    400 code=content_policy_violation
    ├── AuthenticationFailed          401 authentication_error
    ├── InsufficientCredit            402 code=insufficient_credit       (upstream billing; never retried)
    ├── NotFound                      404
    │   └── ModelNotFound             404 code=model_not_found
    ├── PayloadTooLarge               413 code=payload_too_large
    ├── RateLimited                   429 rate_limit_error               (carries retry_after)
    ├── UpstreamError                 502 upstream_error                 (a provider failed)
    │   ├── UpstreamAuthFailed        502 code=upstream_auth_failed      (never echoes the key)
    │   └── UpstreamTimeout           504 code=upstream_timeout
    ├── ProviderUnavailable           503 code=provider_unavailable      (overloaded, runners down)
    │   └── ProviderNotConfigured     503 code=provider_not_configured   (a key is missing)
    ├── InsufficientResources         503 code=insufficient_resources    (image work ran out of memory)
    └── InternalError                 500 server_error

Three facts drive routing: `retryable` (the same call may be made again: the upstream
cannot have taken it), `fallback` (this kind of failure lets the next route be tried;
client errors set neither) and `accepted` (the upstream had taken the job, or may have:
set by the transport that raises the error, from the moment the upstream answered the
submit). An accepted job is never submitted again: not retried, and not sent to the next
route unless `routing.fallback_after_accepted` is on; a 5xx about it tells clients not to
retry (`costly`).

Messages are shown to clients: text an upstream wrote reaches them only through
`core.redact.upstream_text` (secrets and credential shapes removed, markup stripped, capped),
and `envelope()` scrubs the message once more.
"""

from __future__ import annotations

from imagegate.core.redact import scrub

__all__ = [
    "AuthenticationFailed",
    "ContentPolicyViolation",
    "GatewayError",
    "InsufficientCredit",
    "InsufficientResources",
    "InternalError",
    "InvalidRequest",
    "ModelNotFound",
    "NotFound",
    "PayloadTooLarge",
    "ProviderNotConfigured",
    "ProviderUnavailable",
    "RateLimited",
    "UnsupportedParameter",
    "UpstreamAuthFailed",
    "UpstreamError",
    "UpstreamTimeout",
]


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    retryable: bool = False
    fallback: bool = False
    client_retry: bool = True  # False: a retry by the client cannot succeed (sent as `x-should-retry: false`)

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
        fallback: bool | None = None,
        status: int | None = None,
        accepted: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after = retry_after
        if retryable is not None:
            self.retryable = retryable
        if fallback is not None:
            self.fallback = fallback
        # Filled in by the service: the provider and upstream request id, when known.
        self.provider: str | None = None
        self.upstream_request_id: str | None = None
        self._accepted = False
        self._costly = False
        self.accepted = accepted

    @property
    def accepted(self) -> bool:
        """The upstream took (or may have taken) the job: it must not be submitted again. Setting it
        makes the error not retryable (and costly)."""
        return self._accepted

    @accepted.setter
    def accepted(self, value: bool) -> None:
        self._accepted = value
        if value:
            self.retryable = False

    @property
    def costly(self) -> bool:
        """Money may have been spent upstream (always so once `accepted`): clients must not retry
        blindly (`x-should-retry: false`)."""
        return self._costly or self._accepted

    @costly.setter
    def costly(self, value: bool) -> None:
        self._costly = value

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": scrub(self.message), "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class ContentPolicyViolation(InvalidRequest):
    code = "content_policy_violation"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class InsufficientCredit(GatewayError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_credit"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retryable = True
    fallback = True


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"
    fallback = True


class UpstreamAuthFailed(UpstreamError):
    code = "upstream_auth_failed"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ProviderUnavailable(GatewayError):
    status = 503
    type = "upstream_error"
    code = "provider_unavailable"
    retryable = True
    fallback = True


class ProviderNotConfigured(ProviderUnavailable):
    code = "provider_not_configured"
    retryable = False
    client_retry = False


class InsufficientResources(GatewayError):
    """The gateway itself ran short (memory) doing image work: nothing wrong with the request."""

    status = 503
    type = "server_error"
    code = "insufficient_resources"

    def __init__(self, message: str, *, retry_after: float | None = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"
