"""Job webhooks: `POST` the finished job to its `webhook_url`, signed per Standard Webhooks.

Headers `webhook-id` (stable for every attempt of one event: `msg_<job id>`), `webhook-timestamp`
and `webhook-signature: v1,<base64 HMAC-SHA256>` (the `standardwebhooks` package signs with
`webhooks.secret`, `whsec_…`). The body is `{"type": "image.job.<status>", "timestamp", "data":
<the job>}`. Delivery is at least once: any non-2xx answer or connection error is retried with
exponential backoff up to `webhooks.max_attempts`; the state and every attempt are kept on the
job (`webhook`) and in the store, so a restart goes on where it stopped. The URL goes through
the gateway's SSRF guard (`fetch.allow_hosts` admits a private receiver); no redirects are followed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from standardwebhooks.webhooks import Webhook

from imagegate.core.errors import InvalidRequest
from imagegate.core.fetch import GuardedFetcher
from imagegate.jobs.model import Job
from imagegate.observability.metrics import Metrics
from imagegate.providers.common import backoff_delay
from imagegate.settings import WebhookSettings

if TYPE_CHECKING:
    from imagegate.jobs.store import JobStore

__all__ = ["PARAM", "WebhookSender"]

log = logging.getLogger("imagegate.jobs.webhooks")
PARAM = "webhook_url"
_BATCH = 20


class WebhookSender:
    def __init__(
        self, http: httpx.AsyncClient, settings: WebhookSettings, guard: GuardedFetcher, metrics: Metrics | None = None
    ) -> None:
        self.http = http
        self.settings = settings
        self.guard = guard
        self.metrics = metrics
        secret = settings.secret.get_secret_value() if settings.secret is not None else None
        self._signer = Webhook(secret) if secret else None

    @property
    def enabled(self) -> bool:
        return self._signer is not None

    async def check_url(self, url: str) -> None:
        """A 400 naming `webhook_url` at submit time, for a URL the gateway would never call."""
        if not self.enabled:
            raise InvalidRequest("This gateway sends no webhooks (webhooks.secret is not set).", param=PARAM)
        if len(url) > 2048:
            raise InvalidRequest("The webhook URL is longer than 2048 characters.", param=PARAM)
        await self.guard.vetted(url, param=PARAM)

    def initial(self, job: Job) -> dict[str, Any]:
        return {
            "id": f"msg_{job.id}",
            "url": job.webhook_url,
            "type": f"image.job.{job.status}",
            "status": "pending",
            "attempts": [],
            "next_at": time.time(),
        }

    async def deliver_due(self, store: JobStore) -> None:
        """One attempt for each due webhook (up to a batch), concurrently."""
        hold = self.settings.timeout_seconds + 30.0
        jobs = [job for job in await store.due_webhooks(time.time(), _BATCH, hold=hold) if job.webhook is not None]

        async def one(job: Job) -> None:
            state, due = await self.attempt(job)
            await store.save_webhook(job.id, state, due)

        await asyncio.gather(*(one(job) for job in jobs))

    async def attempt(self, job: Job) -> tuple[dict[str, Any], float | None]:
        """One delivery attempt; the new state and when to try again (None: done)."""
        assert job.webhook is not None and self._signer is not None
        state = dict(job.webhook)
        attempts: list[dict[str, Any]] = list(state.get("attempts", []))
        body = json.dumps(
            {"type": state["type"], "timestamp": _iso(time.time()), "data": {**job.public(), "webhook": None}},
            separators=(",", ":"),
        )
        now = datetime.now(tz=UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": state["id"],
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._signer.sign(state["id"], now, body),
        }
        record: dict[str, Any] = {"at": int(time.time())}
        outcome = "error"
        try:
            target, host, extensions = await self.guard.vetted(str(state["url"]), param=PARAM)
            response = await self.http.post(
                target,
                content=body.encode(),
                headers={**headers, **host},
                extensions=extensions,
                timeout=self.settings.timeout_seconds,
                follow_redirects=False,
            )
            record["status"] = response.status_code
            outcome = "success" if response.is_success else f"http_{response.status_code // 100}xx"
        except InvalidRequest as exc:
            record["error"] = exc.message
            outcome = "refused"
        except httpx.HTTPError as exc:
            record["error"] = type(exc).__name__
        attempts.append(record)
        state["attempts"] = attempts
        if self.metrics is not None:
            self.metrics.webhook_deliveries.labels(outcome=outcome).inc()
        if outcome == "success":
            state["status"], state["next_at"] = "delivered", None
            log.info("job %s: webhook delivered (attempt %d)", job.id, len(attempts))
            return state, None
        if outcome == "refused" or len(attempts) >= self.settings.max_attempts:
            state["status"], state["next_at"] = "failed", None
            log.warning("job %s: webhook failed after %d attempt(s)", job.id, len(attempts))
            return state, None
        delay = backoff_delay(len(attempts) - 1, base=self.settings.backoff_base, cap=self.settings.backoff_max)
        state["next_at"] = time.time() + delay
        return state, state["next_at"]


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat().replace("+00:00", "Z")
