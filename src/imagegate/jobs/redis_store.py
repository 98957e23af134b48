"""The distributed job engine: the queue and the job records in Redis (`redis.url` set), delivered
to workers through Redis Streams consumer groups.

Every state change is one Lua script (`redis_lua.py`, `redis_lua_claim.py`), atomic on the server, so any number of API
processes and `imagegate worker` processes share the queue without read-modify-write races.

Delivery. Each provider lane has a stream (`stream:<lane>`, consumer group `workers`; a process's
runner is one consumer). A stream entry is a *ticket*: "the lane has one more due job". Submitting
a due job (or the end of a backoff) adds the job to its key's ready set and XADDs a ticket. An idle
process blocks in one XREADGROUP over the streams of the lanes it has room for (a full lane is
simply not read) plus its own wake stream (`wake:<owner>`, written when a lane of the process gets
room again, so the read is redone with that lane); the block ends when a ticket arrives, at the next
backoff's end, or when another worker's entry will pass the visibility timeout (and after one
visibility timeout at most, since an entry delivered during the block cannot pass it sooner); new
work never waits for a polling interval. The ticket read, one script takes the lane's next job
fairly (the oldest due job of the key with the fewest running jobs, so one key with 10,000 queued
jobs cannot starve another) and binds it to the entry (`bound`, the job's `entry`). Tickets are
interchangeable, so a ticket left over by a job canceled while queued is dropped by its reader.

Running and reclaiming. A running job is its entry, un-ACKed in the group's pending list and owned
by the worker's consumer. The pending list's idle time is the lease: the heartbeat renews it with
`XCLAIM <own entry> JUSTID` by the owner (idle back to zero), and any claim first takes an entry
idle past `jobs.lease_seconds` (the visibility timeout all workers share; `XPENDING IDLE` finds it
anywhere in the pending list, `XCLAIM` takes it), so a dead
worker's entry moves to a live worker, which resumes the same upstream job from the handles saved
on the job (never submitting again). Finishing or requeueing a job ACKs and deletes its entry, so
nothing stays pending; a stopping process marks its entries idle past any lease and adds a ticket
per entry, and the next reader resumes them at once. Backed-off jobs wait in `delayed` (by
`not_before`, compared with the Redis server's clock) without a ticket until a claim promotes them.
Redis failures surface as `StateUnavailable` (a 503 for API calls; the workers log and retry).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from imagegate.jobs import redis_lua as lua
from imagegate.jobs import redis_lua_claim as lua_claim
from imagegate.jobs.contract import cancel_if_queued
from imagegate.jobs.model import Job, JobStatus
from imagegate.state.redis import unavailable_as_503

__all__ = ["RedisJobStore"]

_INTS = ("seq", "attempts")
_FLOATS = ("created_at", "started_at", "finished_at", "not_before", "lease_until")
_JSONS = ("result", "headers", "error", "webhook")
_STRINGS = (
    "id", "key", "model", "operation", "lane", "base_url", "provider", "upstream_request_id", "lease_owner",
    "webhook_url", "idempotency_key", "fingerprint",
)
_FINISH_FIELDS = ("status", "finished_at", "provider", "upstream_request_id", "result", "headers", "error", "webhook")
_BIG_REQUEST = 64 * 1024
_PROGRESS_TTL = 24 * 3600  # a progress report outlives no job by long (cleared when the job finishes)
_READ_TIMEOUT = 5.0  # added to a blocking read's wait when the client has no socket timeout
_CONSUMER_IDLE = 3600.0  # a consumer unseen this long with nothing pending is a stopped process


class RedisJobStore:
    #: `claim(block=...)` waits for work itself (in XREADGROUP); `unblock` ends the wait early.
    claim_blocks = True

    def __init__(self, client: Redis, prefix: str, *, lanes: Sequence[str] = ()) -> None:
        self._redis = client
        self._p = prefix + "jobs:"
        self._lanes = tuple(lanes)  # the lanes this process knows (their streams exist before any job)
        self._scripts = {
            name: client.register_script(getattr(module, name))
            for module in (lua, lua_claim)
            for name in module.__all__
            if name not in ("COMMON", "GROUP")
        }

    async def _call(self, name: str, *args: Any) -> Any:
        with unavailable_as_503(f"running the job store's {name.lower()}"):
            return await self._scripts[name](keys=[], args=[self._p, *args])

    async def add(self, job: Job, request: dict[str, Any]) -> Job:
        """Store a new job; with an idempotency key already used by the same client key, store
        nothing and return the job that has it."""
        if len(request.get("images") or ()) or request.get("mask"):
            body = await asyncio.to_thread(json.dumps, request, separators=(",", ":"))
        else:
            body = json.dumps(request, separators=(",", ":"))
        fields = _fields(job)
        fields.pop("seq", None)
        fields.pop("status", None)
        flat = [item for pair in fields.items() for item in pair]
        seq, found = await self._call(
            "ADD", job.id, job.key, job.idempotency_key or "", job.lane, body, repr(time.time()),
            repr(job.not_before), *flat,
        )
        if int(seq) == 0:
            existing = await self.get(_text(found))
            if existing is not None:
                return existing
        job.seq = int(seq)
        return job

    async def _load(self, ids: Sequence[str]) -> list[Job]:
        if not ids:
            return []
        with unavailable_as_503("reading jobs"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self._p + "job:" + job_id)
                    pipe.hgetall(self._p + "handles:" + job_id)
                raw = await pipe.execute()
            jobs = [_job(raw[i], raw[i + 1]) for i in range(0, len(raw), 2) if raw[i]]
            queued = [job for job in jobs if job.status == "queued"]
            if queued:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for job in queued:
                        pipe.zcount(self._p + "queued", "-inf", f"({job.seq}")
                    for job, position in zip(queued, await pipe.execute(), strict=True):
                        job.queue_position = int(position)
        return jobs

    async def get(self, job_id: str) -> Job | None:
        jobs = await self._load([job_id])
        return jobs[0] if jobs else None

    async def page(self, key: str, *, limit: int, after: str | None, status: str | None) -> list[Job]:
        index = self._p + "bykey:" + key
        with unavailable_as_503("listing jobs"):
            top = "+inf"
            if after is not None:
                score = await self._redis.zscore(index, after)
                if score is None:
                    return []
                top = f"({int(score)}"
            out: list[Job] = []
            offset, batch = 0, max(limit, 100) if status is not None else limit
            while len(out) < limit:
                ids = await self._redis.zrevrangebyscore(index, top, "-inf", start=offset, num=batch)
                if not ids:
                    break
                offset += len(ids)
                jobs = await self._load([_text(i) for i in ids])
                out += [job for job in jobs if status is None or job.status == status]
        return out[:limit]

    async def request_of(self, job_id: str) -> dict[str, Any] | None:
        with unavailable_as_503("reading a job's request"):
            raw = await self._redis.get(self._p + "req:" + job_id)
        if raw is None:
            return None
        return dict(await asyncio.to_thread(json.loads, raw) if len(raw) > _BIG_REQUEST else json.loads(raw))

    async def claim(
        self, owner: str, *, lease: float, exclude_lanes: Sequence[str], block: float = 0.0
    ) -> Job | None:
        """The next job for `owner`: first an entry idle past `lease` (its worker died: resumed
        here), else a ticket of a lane not excluded, bound to the lane's next job (fair per key).
        With `block`, wait up to that long in XREADGROUP for a ticket when there is none."""
        found = await self._call(
            "CLAIM", owner, repr(float(lease)), repr(float(block)), len(exclude_lanes), *exclude_lanes, *self._lanes
        )
        if found[0]:
            return _job(_pairs(found[0]), _pairs(found[1]))
        if block <= 0:
            return None
        wake, tickets = await self._read(owner, [_text(lane) for lane in found[2]], float(found[1]))
        if not wake and not tickets:
            return None
        bound = await self._call(
            "BIND", owner, repr(float(lease)), len(wake), *wake, *(item for pair in tickets for item in pair)
        )
        return _job(_pairs(bound[0]), _pairs(bound[1])) if bound else None

    async def _read(self, owner: str, lanes: list[str], wait: float) -> tuple[list[str], list[tuple[str, str]]]:
        """Block in XREADGROUP (COUNT 1 per stream) on the lanes' streams and the owner's wake
        stream, on a connection of its own with a read timeout of `wait` plus the usual command
        timeout: (wake entries, [(lane, ticket entry)])."""
        streams = [self._p + "stream:" + lane for lane in lanes]
        wake_key = self._p + "wake:" + owner
        streams.append(wake_key)
        command = (
            "XREADGROUP", "GROUP", lua.GROUP, owner, "COUNT", 1, "BLOCK", max(1, round(wait * 1000)),
            "STREAMS", *streams, *[">"] * len(streams),
        )
        pool = self._redis.connection_pool
        with unavailable_as_503("waiting for jobs"):
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await connection.send_command(*command)
                timeout = getattr(connection, "socket_timeout", None) or _READ_TIMEOUT
                # Our own deadline: read_response(timeout=x) would answer None when x passes, the
                # same as an empty read, and leave the late reply on a connection back in the pool.
                async with asyncio.timeout(wait + timeout):
                    reply = await connection.read_response(timeout=math.inf)
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
            finally:
                await pool.release(connection)
        wake: list[str] = []
        tickets: list[tuple[str, str]] = []
        streams_read = reply.items() if isinstance(reply, dict) else (reply or ())  # RESP3: a map; RESP2: pairs
        for name, entries in streams_read:
            key = _text(name)
            for entry in entries:
                if key == wake_key:
                    wake.append(_text(entry[0]))
                else:
                    tickets.append((key.removeprefix(self._p + "stream:"), _text(entry[0])))
        return wake, tickets

    async def unblock(self, owner: str) -> None:
        """End `owner`'s blocked claim now (or its next one, if none is blocked yet)."""
        await self._call("UNBLOCK", owner)

    async def renew(self, job_id: str, owner: str, *, lease: float) -> bool | None:
        """Extend the lease. Returns whether a cancel was requested; None if the job is no longer ours."""
        out = int(await self._call("RENEW", job_id, owner, repr(float(lease))))
        return None if out < 0 else bool(out)

    async def save_handle(
        self, job_id: str, key: str, handle: dict[str, Any], upstream_id: str | None, *, owner: str | None = None
    ) -> bool:
        """Record an accepted upstream job's handle; with `owner`, only while that worker holds the job."""
        provider = handle.get("provider")
        return bool(await self._call(
            "SAVE_HANDLE", job_id, key, json.dumps(handle), upstream_id or "", provider if isinstance(provider, str)
            else "", owner or "",
        ))

    async def save_progress(self, job_id: str, progress: dict[str, Any] | None) -> None:
        """The upstream's report on the running job (None: clear it); expires with the lease's life."""
        with unavailable_as_503("saving a job's progress"):
            if progress is None:
                await self._redis.delete(self._p + "progress:" + job_id)
            else:
                await self._redis.set(self._p + "progress:" + job_id, json.dumps(progress), ex=_PROGRESS_TTL)

    async def progress_of(self, job_id: str) -> dict[str, Any] | None:
        with unavailable_as_503("reading a job's progress"):
            raw = await self._redis.get(self._p + "progress:" + job_id)
        return None if raw is None else dict(json.loads(raw))

    async def requeue(self, job_id: str, owner: str, *, not_before: float, error: dict[str, Any]) -> bool:
        return bool(await self._call("REQUEUE", job_id, owner, repr(not_before), json.dumps(error), repr(time.time())))

    async def finish(self, job: Job, owner: str | None) -> bool:
        """Write a terminal job (status, result, error, webhook); False if another worker owns it."""
        job.finished_at = job.finished_at or time.time()
        fields = _fields(job)
        drop = [name for name in _FINISH_FIELDS if name not in fields]
        keep = [item for name in _FINISH_FIELDS if name in fields for item in (name, fields[name])]
        due = job.webhook.get("next_at") if job.webhook else None
        out = await self._call(
            "FINISH", job.id, owner or "", "" if due is None else repr(float(due)), len(drop), *drop, *keep
        )
        return bool(out)

    async def release(self, owner: str) -> int:
        """Expire the leases of `owner` (a stopping process): the next worker resumes its jobs at once."""
        return int(await self._call("RELEASE", owner))

    async def forget_consumers(self, idle: float) -> int:
        """Drop the consumers (processes) with nothing pending not seen for `idle` seconds."""
        return int(await self._call("FORGET", int(idle * 1000)))

    async def cancel_queued(self, job_id: str) -> bool:
        return await cancel_if_queued(self, job_id)

    async def request_cancel(self, job_id: str) -> None:
        await self._call("REQUEST_CANCEL", job_id)

    async def counts(self) -> dict[str, int]:
        with unavailable_as_503("counting jobs"):
            raw = await self._redis.hgetall(self._p + "counts")
        return {_text(k): int(v) for k, v in raw.items() if int(v) > 0}

    async def purge(self, before: float) -> int:
        await self.forget_consumers(_CONSUMER_IDLE)
        total = 0
        while True:
            n = int(await self._call("PURGE", repr(before), 500))
            total += n
            if n < 500:
                return total

    async def due_webhooks(self, now: float, limit: int, *, hold: float) -> list[Job]:
        """Jobs whose webhook is due, taken for `hold` seconds (their due time moves on, so another
        process does not send the same attempt; an attempt that never reports back is retried)."""
        ids = await self._call("DUE_WEBHOOKS", repr(now), limit, repr(now + hold))
        return await self._load([_text(i) for i in ids])

    async def save_webhook(self, job_id: str, webhook: dict[str, Any], due: float | None) -> None:
        await self._call("SAVE_WEBHOOK", job_id, json.dumps(webhook), "" if due is None else repr(float(due)))

    async def close(self) -> None:
        """Nothing to do: the Redis client is the app's, closed with it."""


def _fields(job: Job) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in (*_INTS, *_FLOATS, *_JSONS, *_STRINGS, "status", "cancel_requested"):
        value = getattr(job, name)
        if value is None:
            continue
        if name in _JSONS:
            out[name] = json.dumps(value, separators=(",", ":"))
        elif name == "cancel_requested":
            out[name] = "1" if value else "0"
        elif name in _FLOATS:
            out[name] = repr(float(value))
        else:
            out[name] = str(value)
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _job(raw: dict[bytes, bytes], handles: dict[bytes, bytes]) -> Job:
    values = {k.decode(): v.decode() for k, v in raw.items()}
    kwargs: dict[str, Any] = {}
    for name in _INTS:
        kwargs[name] = int(values.get(name, 0))
    for name in _FLOATS:
        if name in values:
            kwargs[name] = float(values[name])
    for name in _JSONS:
        if name in values:
            kwargs[name] = json.loads(values[name])
    for name in _STRINGS:
        if name in values:
            kwargs[name] = values[name]
    kwargs["headers"] = kwargs.get("headers") or {}
    kwargs["cancel_requested"] = values.get("cancel_requested") == "1"
    kwargs["handles"] = {k.decode(): json.loads(v) for k, v in handles.items()}
    status: JobStatus = values["status"]  # type: ignore[assignment]
    return Job(status=status, **kwargs)
