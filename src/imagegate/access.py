"""The one seam between an authenticated request and the image service.

`Access` (built by the app factory, `app.state.access`) holds the client keys, the limiter, the
idempotency store and the usage ledger, in memory or on the shared Redis. `service_for(request)`
returns the service the image endpoints call for this request: a `ClientService` with the same
`run(...)` as `ImageService`, which, in this order,

1. refuses a model outside the key's allow-list (403 `model_not_allowed`);
2. with an `Idempotency-Key` header, replays the stored response or waits for the running one;
3. admits the request under the key's limits (429 before any upstream call), holding a
   concurrency slot until the service returns, fails or is cancelled;
4. runs the service, then adds `x-ratelimit-*` and `x-imagegate-cost-usd` to the response and
   counts requests, images, megapixels and cost for the key.

Dry runs (an async job's validation among them) pass the allow-list and a check that the key's
limits could ever admit the request (`n` within `images_per_minute`); they call no upstream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from starlette.requests import Request
from starlette.types import Scope

from imagegate.api.admission import charge_inputs, discharge_inputs
from imagegate.auth.keys import ClientKey, KeyLimits, KeyRing
from imagegate.auth.middleware import client_of
from imagegate.core.catalog import Catalog
from imagegate.core.errors import InternalError
from imagegate.core.request import ImageRequest
from imagegate.core.results import DryRunResult, ImageResult
from imagegate.idempotency import IDEMPOTENCY_HEADER, Idempotency, IdempotencyStore, MemoryStore, RedisStore
from imagegate.limits import Limiter, MemoryLimiter, RedisLimiter, refuse_unadmittable
from imagegate.settings import Settings
from imagegate.storage.base import Storage
from imagegate.usage import COST_HEADER, MemoryLedger, PriceTable, RedisLedger, UsageLedger
from imagegate.usage.prices import format_cost
from imagegate.usage.routes import ANONYMOUS

__all__ = ["Access", "ClientService", "RunService", "service_for"]

log = logging.getLogger("imagegate.auth")  # "imagegate.access" is left to the request log
RunResult = ImageResult | DryRunResult
_NO_LIMITS = KeyLimits()  # an anonymous client's (immutable)


class RunService(Protocol):
    async def run(
        self,
        request: ImageRequest,
        *,
        request_id: str,
        base_url: str,
        dry_run: bool = False,
        on_plan: Callable[[Mapping[str, str]], None] | None = None,
    ) -> RunResult: ...


@dataclass(frozen=True, slots=True)
class Access:
    keyring: KeyRing
    limiter: Limiter
    idempotency: Idempotency
    ledger: UsageLedger
    prices: PriceTable

    @classmethod
    def build(cls, settings: Settings, *, storage: Storage, redis: Redis | None) -> Access:
        keyring = KeyRing.from_settings(settings.auth)
        if keyring.open:
            log.warning("no client keys are configured (auth.keys): the gateway is open to anyone who can reach it")
        lease = settings.redis.lease_seconds
        prefix = settings.redis.key_prefix
        limiter: Limiter
        store: IdempotencyStore
        ledger: UsageLedger
        if redis is None:
            limiter, store, ledger = MemoryLimiter(), MemoryStore(), MemoryLedger()
        else:
            limiter = RedisLimiter(redis, prefix=prefix, lease_seconds=lease)
            store, ledger = RedisStore(redis, prefix=prefix), RedisLedger(redis, prefix=prefix)
        idempotency = Idempotency(
            store,
            storage,
            ttl_seconds=settings.idempotency.ttl_seconds,
            lease_seconds=lease,
            max_wait_seconds=settings.routing.deadline_seconds + lease,
        )
        return cls(keyring, limiter, idempotency, ledger, PriceTable.from_models(settings.models))


def service_for(request: Request) -> RunService:
    """The service the image endpoints call for `request` (the bare service when no Access is set up)."""
    state = request.app.state
    service: RunService = state.service
    access: Access | None = getattr(state, "access", None)
    if access is None:
        return service
    return ClientService(
        access,
        service,
        client_of(request),
        request.headers.get(IDEMPOTENCY_HEADER),
        scope=request.scope,
        catalog=getattr(state, "catalog", None),
    )


class ClientService:
    def __init__(
        self,
        access: Access,
        service: RunService,
        client: ClientKey | None,
        idempotency_key: str | None,
        *,
        scope: Scope | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.scope = scope  # the request's, for its share of the in-flight budget
        self.catalog = catalog  # to refuse a bad route pin before the limits count the request
        self.access = access
        self.service = service
        self.client = client
        self.idempotency_key = idempotency_key
        self.name = client.name if client is not None else ANONYMOUS

    async def run(
        self,
        request: ImageRequest,
        *,
        request_id: str,
        base_url: str,
        dry_run: bool = False,
        on_plan: Callable[[Mapping[str, str]], None] | None = None,
    ) -> RunResult:
        if self.client is not None:
            self.client.check_model(request.model)
        if request.route is not None and self.catalog is not None:  # a bad pin uses up no rpm
            self.catalog.get(request.model).pinned(request.route)
        if dry_run:  # also refused: a request the key's limits can never admit (an async job would wait forever)
            refuse_unadmittable(self.name, self.client.limits if self.client is not None else _NO_LIMITS, request.n)
            return await self.service.run(request, request_id=request_id, base_url=base_url, dry_run=True)
        kwargs: dict[str, Any] = {"request_id": request_id, "base_url": base_url, "on_plan": on_plan}

        if self.idempotency_key is None:
            return await self._admitted(request, kwargs)
        scope = self.scope

        async def work() -> ImageResult:
            if scope is not None:  # a duplicate that waited gave its decoded share back: take it again
                await charge_inputs(scope, request)
            return await self._admitted(request, kwargs)

        async def on_wait() -> None:  # nothing is decoded while waiting: hold only the body
            if scope is not None:
                await discharge_inputs(scope)

        result = await self.access.idempotency.run(self.name, self.idempotency_key, request, work, on_wait=on_wait)
        result.headers.setdefault(COST_HEADER, format_cost(0.0))  # a replay costs nothing
        return result

    async def _admitted(self, request: ImageRequest, kwargs: dict[str, Any]) -> ImageResult:
        limits = self.client.limits if self.client is not None else _NO_LIMITS
        if limits:
            async with self.access.limiter.admit(self.name, limits, request.n) as admission:
                result = await self.service.run(request, **kwargs)
            rate_headers = admission.headers
        else:  # a key without limits: nothing to admit, take or give back (what `admit` does for it)
            result = await self.service.run(request, **kwargs)
            rate_headers = {}
        if not isinstance(result, ImageResult):  # pragma: no cover - only dry runs return anything else
            raise InternalError("The service returned no images.")
        cost = self.access.prices.cost(request.model, result)
        result.headers.update(rate_headers)
        result.headers[COST_HEADER] = format_cost(cost)
        try:
            await self.access.ledger.record(
                self.name,
                images=int(result.usage.get("images", len(result.data))),
                megapixels=float(result.usage.get("megapixels", 0.0)),
                cost_usd=cost,
            )
        except Exception:  # the images are made and paid for: answer anyway
            log.warning("could not count the usage of key %s", self.name, exc_info=True)
        return result
