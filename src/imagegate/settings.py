"""Settings: the YAML config file, then the environment on top (pydantic-settings).

Sources, strongest first: keyword arguments, `IMAGEGATE_*` environment variables (nested with
`__`, e.g. `IMAGEGATE_PROVIDERS__FAL__QUEUE_URL`), the YAML file, the defaults below. The YAML
file may reference the environment as `${NAME}` or `${NAME:-default}` (for secrets). There is
no module-level instance: the app factory and the CLI call `load_settings`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from imagegate.config_file import DEFAULT_CONFIG, deep_merge, interpolate_env, read_yaml

__all__ = [
    "DEFAULT_CONFIG",
    "AuthSettings",
    "ClientKeyConfig",
    "DeliverySettings",
    "FalSettings",
    "FetchSettings",
    "IdempotencySettings",
    "JobsSettings",
    "LimitsSettings",
    "LoggingSettings",
    "ModelConfig",
    "OpenAISettings",
    "ProvidersSettings",
    "RedisSettings",
    "ReplicateSettings",
    "RouteConfig",
    "RoutePrice",
    "RoutingSettings",
    "S3StorageSettings",
    "ServerSettings",
    "Settings",
    "StorageSettings",
    "WebhookSettings",
    "interpolate_env",
    "load_settings",
    "merged_config",
]

def _secret_or_none(value: Any) -> Any:
    return None if value in ("", None) else value


def _http_url(value: str) -> str:
    """An absolute http(s) URL with a host (a setting that is not one cannot work)."""
    try:
        parts = urlsplit(value)
        ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # e.g. a bad port or IPv6 literal
        ok = False
    if not ok or any(c.isspace() for c in value):
        raise ValueError("must be an http(s) URL such as https://example.com")
    return value


def _lowercase(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


# Ranges every setting is checked against at startup (a setting outside its range cannot work).
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


class FalSettings(BaseModel):
    key: SecretStr | None = None  # FAL_KEY
    key_id: SecretStr | None = None  # FAL_KEY_ID (with key_secret, when no key)
    key_secret: SecretStr | None = None
    queue_url: HttpUrl = "https://queue.fal.run"
    run_url: HttpUrl = "https://fal.run"
    rest_url: HttpUrl = "https://rest.fal.ai"
    mode: Literal["queue", "sync"] = "queue"
    inline_max_bytes: NonNegativeInt = 1_000_000  # inputs up to this size go as data URIs, larger ones are uploaded
    poll_interval: PositiveFloat = 0.5
    poll_max_interval: PositiveFloat = 3.0
    status_stream: bool = True  # follow the SSE status stream (polling where fal does not serve it)
    status_stream_max: int | None = Field(None, ge=0)  # open streams per process (more poll); default: file limit
    job_poll_interval: PositiveFloat = 0.1  # async jobs: the first poll interval, at most (then as poll_interval)
    job_status_stream: bool = False  # async jobs follow the SSE status stream (connections bounded by the workers)
    sync_mode_b64: bool = False  # for b64_json, ask fal for data URIs instead of downloading
    max_concurrent_jobs: int | None = Field(None, ge=1)  # async jobs running on fal at once (per process)

    _empty = field_validator("key", "key_id", "key_secret", mode="before")(_secret_or_none)


class ReplicateSettings(BaseModel):
    api_token: SecretStr | None = None  # REPLICATE_API_TOKEN
    base_url: HttpUrl = "https://api.replicate.com/v1"
    wait_seconds: int = Field(60, ge=1, le=60)  # `Prefer: wait=N`
    inline_max_bytes: NonNegativeInt = 256_000  # larger inputs go through the Files API
    poll_interval: PositiveFloat = 0.5
    poll_max_interval: PositiveFloat = 3.0
    job_poll_interval: PositiveFloat = 0.1  # async jobs: the first poll interval, at most (then as poll_interval)
    max_concurrent_jobs: int | None = Field(None, ge=1)  # async jobs running on Replicate at once (per process)

    _empty = field_validator("api_token", mode="before")(_secret_or_none)


class OpenAISettings(BaseModel):
    api_key: SecretStr | None = None  # OPENAI_API_KEY
    base_url: HttpUrl = "https://api.openai.com/v1"
    max_concurrent_jobs: int | None = Field(None, ge=1)  # async jobs running on OpenAI at once (per process)

    _empty = field_validator("api_key", mode="before")(_secret_or_none)


class SandboxSettings(BaseModel):
    delay_seconds: NonNegativeFloat = 0.0  # simulated model latency
    max_operations: int = Field(16, ge=1)  # prompt operations one edit may run (400 naming `prompt` above)
    max_concurrent_jobs: int | None = Field(None, ge=1)  # async jobs running on the sandbox at once


class ProvidersSettings(BaseModel):
    fal: FalSettings = FalSettings()
    replicate: ReplicateSettings = ReplicateSettings()
    openai: OpenAISettings = OpenAISettings()
    sandbox: SandboxSettings = SandboxSettings()


class LimitsSettings(BaseModel):
    max_image_bytes: PositiveInt = 50 * 1024 * 1024  # per uploaded image (OpenAI: < 50 MB)
    max_mask_bytes: PositiveInt = 4 * 1024 * 1024
    max_body_bytes: PositiveInt = 100 * 1024 * 1024  # a whole request body
    max_pixels: PositiveInt = 40_000_000  # per input image (from its header, before decoding) and per output
    max_images: int = Field(16, ge=1, le=1000)
    max_prompt_chars: PositiveInt = 32_000
    # The in-flight budget of image requests (api/admission.py): beyond it, a short FIFO wait, then 503 server_busy.
    max_inflight_requests: PositiveInt = 10_000
    max_inflight_bytes: PositiveInt = 512 * 1024 * 1024  # bodies + decoded inputs of the image requests in flight
    max_queued: NonNegativeInt = 256  # requests waiting for the budget; more get 503 at once
    queue_timeout_seconds: NonNegativeFloat = 2.0  # the longest wait for the budget (0: no queue)
    busy_retry_after_seconds: NonNegativeFloat = 1.0  # `retry-after` on 503 server_busy
    trim_after_bytes: NonNegativeInt = 256 * 1024 * 1024  # malloc_trim once this much was released (0: never)


class S3StorageSettings(BaseModel):
    """`storage.s3`: an S3-compatible bucket (AWS, MinIO, R2, ...) for `storage.backend: s3`."""

    bucket: str = ""
    endpoint_url: HttpUrl | None = None  # empty = AWS
    public_endpoint_url: HttpUrl | None = None  # presigned URLs are signed for this host (default: endpoint_url)
    region: str = "us-east-1"
    access_key_id: str | None = None  # empty = the environment / instance credentials
    secret_access_key: SecretStr | None = None
    prefix: str = "outputs/"
    url_style: Literal["presigned", "gateway"] = "presigned"
    timeout_seconds: PositiveFloat = 30.0  # per S3 request (retries included)

    _empty = field_validator(
        "endpoint_url", "public_endpoint_url", "access_key_id", "secret_access_key", mode="before"
    )(_secret_or_none)


class StorageSettings(BaseModel):
    backend: Literal["local", "s3"] = "local"
    path: Path = Path("data/images")
    ttl_seconds: PositiveInt = 3600
    s3: S3StorageSettings = S3StorageSettings()

    @model_validator(mode="after")
    def _check_s3(self) -> StorageSettings:
        if self.backend == "s3":
            if not self.s3.bucket:
                raise ValueError("storage.backend is s3 but storage.s3.bucket is empty")
            if self.s3.url_style == "presigned" and self.ttl_seconds > 604_800:
                raise ValueError("presigned S3 URLs live at most 7 days: storage.ttl_seconds must be <= 604800")
        return self


class LoggingSettings(BaseModel):
    format: Literal["text", "json"] = "text"  # json: one object per line (time, level, request id, ...)
    log_prompts: bool = False  # prompts go into the request log only when true


class DeliverySettings(BaseModel):
    url_mode: Literal["rehost", "passthrough"] = "rehost"
    public_base_url: HttpUrl | None = None  # e.g. https://images.example.com; default: the request's base URL
    default_response_format: Literal["url", "b64_json"] = "url"

    _empty = field_validator("public_base_url", mode="before")(_secret_or_none)  # "" = not set


class RoutingSettings(BaseModel):
    deadline_seconds: PositiveFloat = 300.0  # per request, all routes and retries included
    max_attempts: PositiveInt = 3  # per route, for retryable failures
    backoff_base: NonNegativeFloat = 0.5
    backoff_max: NonNegativeFloat = 8.0
    fanout_concurrency: PositiveInt = 4  # parallel upstream calls for an emulated `n`
    keepalive_seconds: PositiveFloat = 10.0  # SSE comment interval while streaming
    # After an upstream accepted a job that then failed, try the next route anyway (may pay twice).
    fallback_after_accepted: bool = False


class FetchSettings(BaseModel):
    """The guard for image URLs the gateway itself must fetch (the JSON form of edits)."""

    allow_hosts: list[str] = []  # hosts exempt from the private-address block (operators, tests)
    max_bytes: PositiveInt = 50 * 1024 * 1024
    timeout_seconds: PositiveFloat = 20.0


class ServerSettings(BaseModel):
    """The HTTP server of `imagegate serve` (per worker process; see README "Server runtime")."""

    header_timeout: float = Field(10.0, gt=0)  # a request's headers must arrive within this (also a new idle socket)
    body_timeout: float = Field(30.0, gt=0)  # the body gets this long, plus 1 s per `body_min_rate` bytes received
    body_min_rate: int = Field(10_000, ge=1)  # bytes per second
    keepalive_timeout: float = Field(5.0, gt=0)  # an idle keep-alive connection is closed after this
    max_connections: int | None = Field(None, ge=1)  # per worker; default: 3/4 of the open-file limit
    reserved_connections: int = Field(32, ge=1)  # beyond the cap: only /healthz and /readyz are served
    backlog: int | None = Field(None, ge=1)  # accept queue per listening socket; default: net.core.somaxconn
    listeners: int | None = Field(None, ge=1, le=64)  # SO_REUSEPORT sockets (Linux); default: enough for the cap
    starts_per_tick: int = Field(64, ge=0)  # new requests started per event-loop iteration (0: no limit)
    log_interval: float = Field(10.0, gt=0)  # a resource-exhaustion condition is logged at most this often
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    http: Literal["auto", "h11", "httptools"] = "auto"
    access_log: bool = False  # uvicorn's line per request (off: it costs ~6% of a request's CPU)


class RoutePrice(BaseModel):
    """What a route's upstream charges, for the cost estimate (`x-imagegate-cost-usd`, `/v1/usage`)."""

    model_config = {"extra": "forbid"}

    per_image: float | None = Field(None, ge=0)
    per_megapixel: float | None = Field(None, ge=0)


class RouteConfig(BaseModel):
    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)
    options: dict[str, Any] = {}
    timeout_seconds: PositiveFloat | None = None
    url_mode: Literal["rehost", "passthrough"] | None = None
    price: RoutePrice | None = None


class ClientKeyConfig(BaseModel):
    """One client key (`auth.keys[]`): `key` or `key_sha256` (the hex digest, so the file holds no secret)."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    key: SecretStr | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    models: list[str] | None = None  # allow-list; None = every model
    rpm: int | None = Field(None, ge=1)
    images_per_minute: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    admin: bool = False  # GET /v1/usage shows every key
    webhook_url: str | None = None

    _empty = field_validator("key", "key_sha256", mode="before")(_secret_or_none)

    @model_validator(mode="after")
    def _one_secret(self) -> ClientKeyConfig:
        if self.name == "anonymous":
            raise ValueError("auth key name 'anonymous' is reserved (requests without a key count under it)")
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"auth key {self.name!r}: set exactly one of `key` and `key_sha256`")
        return self


class AuthSettings(BaseModel):
    keys: list[ClientKeyConfig] = []  # none: the gateway is open

    @model_validator(mode="after")
    def _unique_names(self) -> AuthSettings:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("auth.keys: every key needs its own `name`")
        return self


class RedisSettings(BaseModel):
    url: str | None = None  # e.g. redis://127.0.0.1:6379/0; empty = in-memory state
    key_prefix: str = "imagegate:"
    timeout_seconds: float = Field(2.0, gt=0)  # per Redis command; an outage is a 503, never a hang
    lease_seconds: float = Field(30.0, gt=0)  # concurrency slots and running idempotent requests

    _empty = field_validator("url", mode="before")(_secret_or_none)


class IdempotencySettings(BaseModel):
    ttl_seconds: int = Field(86400, ge=1)


class JobsSettings(BaseModel):
    """Async image jobs (`Prefer: respond-async`; README "Async image jobs")."""

    path: Path | None = None  # the embedded SQLite job database (default: jobs.db beside storage.path)
    workers: int = Field(4, ge=0)  # in-process job workers; 0: this process only accepts jobs
    retention_seconds: int = Field(86400, ge=1)  # finished jobs (and their results) are kept this long
    max_wait_seconds: float = Field(3600.0, gt=0)  # retryable failures requeue the job until this age
    lease_seconds: float = Field(30.0, gt=0)  # a running job whose worker stops renewing it is reclaimed
    poll_seconds: float = Field(0.5, gt=0)  # SQLite: idle workers look for due jobs this often (Redis: they block)
    backoff_base: float = Field(2.0, gt=0)  # requeue delay after a retryable failure: base * 2^k ...
    backoff_max: float = Field(60.0, gt=0)  # ... capped here


class WebhookSettings(BaseModel):
    """Job webhooks, signed per Standard Webhooks (README "Webhooks")."""

    secret: SecretStr | None = None  # whsec_<base64>; required for webhooks to be sent
    max_attempts: int = Field(8, ge=1)
    backoff_base: float = Field(1.0, gt=0)
    backoff_max: float = Field(300.0, gt=0)
    timeout_seconds: float = Field(10.0, gt=0)

    _empty = field_validator("secret", mode="before")(_secret_or_none)


class ModelConfig(BaseModel):
    routes: list[RouteConfig] = Field(min_length=1)
    owned_by: str = "imagegate"
    created: NonNegativeInt = 1_767_225_600  # 2026-01-01
    description: str = ""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGATE_", env_nested_delimiter="__", extra="forbid")

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=0, le=65535)
    workers: PositiveInt = 1
    image_workers: PositiveInt | None = None  # threads for image work (default: CPU count)
    log_level: LogLevel = "info"
    logging: LoggingSettings = LoggingSettings()
    shutdown_grace_seconds: int = Field(30, ge=0)  # on SIGTERM: finish in-flight requests this long
    server: ServerSettings = ServerSettings()
    limits: LimitsSettings = LimitsSettings()
    storage: StorageSettings = StorageSettings()
    delivery: DeliverySettings = DeliverySettings()
    routing: RoutingSettings = RoutingSettings()
    fetch: FetchSettings = FetchSettings()
    providers: ProvidersSettings = ProvidersSettings()
    models: dict[str, ModelConfig] = {}
    auth: AuthSettings = AuthSettings()
    redis: RedisSettings = RedisSettings()
    idempotency: IdempotencySettings = IdempotencySettings()
    playground: bool = True  # serve the browser playground at / and /playground
    jobs: JobsSettings = JobsSettings()
    webhooks: WebhookSettings = WebhookSettings()

    @model_validator(mode="after")
    def _allow_lists_name_known_models(self) -> Settings:
        for key in self.auth.keys:
            unknown = sorted(set(key.models or ()) - set(self.models))
            if unknown:
                raise ValueError(f"auth key {key.name!r}: unknown model(s) in `models`: {', '.join(unknown)}")
        return self

    _level = field_validator("log_level", mode="before")(_lowercase)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from `path` (or `$IMAGEGATE_CONFIG`, or the packaged default) plus the environment.

    The environment wins over the file; `overrides` win over both."""
    return Settings.model_validate(merged_config(path, **overrides))


def merged_config(path: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """The raw settings data `load_settings` validates: the file, the environment, `overrides`."""
    chosen = path or os.environ.get("IMAGEGATE_CONFIG") or None
    file_data = read_yaml(Path(chosen) if chosen else None)
    env_data = Settings().model_dump(exclude_unset=True)  # the environment alone
    return deep_merge(deep_merge(file_data, env_data), overrides)
