"""Where jobs live: the embedded engine, SQLite (WAL) under the data directory (the interface,
`JobStore`, is in `jobs/contract.py` and re-exported here).

The standard library's sqlite3 runs in the thread pool; one connection per store, serialised by a
lock, and every claim in a `BEGIN IMMEDIATE` transaction, so several processes on one database
(`imagegate serve --workers N`) never take the same job. A job is claimed by writing a lease
(`lease_owner`, `lease_until`) that its worker renews; a job whose lease ran out (its worker died)
is claimed again like a queued one. The request (with its image bytes) lives in its own table and
is dropped once the job is finished.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from imagegate.jobs.contract import JobStore, cancel_if_queued
from imagegate.jobs.model import Job, JobStatus

__all__ = ["JobStore", "SqliteJobStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    key TEXT NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    operation TEXT NOT NULL,
    lane TEXT NOT NULL,
    base_url TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    not_before REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    provider TEXT,
    upstream_request_id TEXT,
    handles TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    headers TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    webhook_url TEXT,
    webhook TEXT,
    webhook_due REAL,
    idempotency_key TEXT,
    fingerprint TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (key, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, not_before);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs (key, seq);
CREATE INDEX IF NOT EXISTS jobs_webhook_due ON jobs (webhook_due);
CREATE TABLE IF NOT EXISTS job_requests (id TEXT PRIMARY KEY, request TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_progress (id TEXT PRIMARY KEY, progress TEXT NOT NULL);
"""
_JSON_COLUMNS = ("handles", "result", "headers", "error", "webhook")
_COLUMNS = (
    "seq", "id", "key", "status", "model", "operation", "lane", "base_url", "created_at", "started_at",
    "finished_at", "not_before", "attempts", "provider", "upstream_request_id", "handles", "result", "headers",
    "error", "cancel_requested", "lease_owner", "lease_until", "webhook_url", "webhook", "idempotency_key",
    "fingerprint",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"



class SqliteJobStore:
    claim_blocks = False  # claims return at once; the runner's in-process wake-ups end its waits

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn(self._db)

        return await asyncio.to_thread(locked)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` inside BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""

        def transaction(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return out

        return await self._run(transaction)

    async def add(self, job: Job, request: dict[str, Any]) -> Job:
        """Store a new job; with an idempotency key already used by the same client key, store
        nothing and return the job that has it."""
        row = _row(job)
        row.pop("seq")
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)

        def insert(db: sqlite3.Connection) -> Job:
            if job.idempotency_key is not None:
                found = db.execute(
                    f"{_SELECT} WHERE key = ? AND idempotency_key = ?", (job.key, job.idempotency_key)
                ).fetchone()
                if found is not None:
                    return _job(found)
            body = json.dumps(request, separators=(",", ":"))  # in the thread: it may hold megabytes of images
            cursor = db.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(row.values()))
            job.seq = int(cursor.lastrowid or 0)
            db.execute("INSERT INTO job_requests (id, request) VALUES (?, ?)", (job.id, body))
            return job

        return await self._write(insert)

    async def get(self, job_id: str) -> Job | None:
        def read(db: sqlite3.Connection) -> Job | None:
            found = db.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
            if found is None:
                return None
            job = _job(found)
            if job.status == "queued":
                job.queue_position = _position(db, job)
            return job

        return await self._run(read)

    async def page(self, key: str, *, limit: int, after: str | None, status: str | None) -> list[Job]:
        def read(db: sqlite3.Connection) -> list[Job]:
            where, args = ["key = ?"], [key]
            if after is not None:
                where.append("seq < COALESCE((SELECT seq FROM jobs WHERE id = ? AND key = ?), -1)")
                args += [after, key]
            if status is not None:
                where.append("status = ?")
                args.append(status)
            rows = db.execute(
                f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?", (*args, limit)
            ).fetchall()
            jobs = [_job(row) for row in rows]
            for job in jobs:
                if job.status == "queued":
                    job.queue_position = _position(db, job)
            return jobs

        return await self._run(read)

    async def request_of(self, job_id: str) -> dict[str, Any] | None:
        def read(db: sqlite3.Connection) -> dict[str, Any] | None:
            found = db.execute("SELECT request FROM job_requests WHERE id = ?", (job_id,)).fetchone()
            return None if found is None else dict(json.loads(found[0]))

        return await self._run(read)

    async def claim(
        self, owner: str, *, lease: float, exclude_lanes: Sequence[str], block: float = 0.0
    ) -> Job | None:
        """The next due job: queued (and past its `not_before`) or in progress with an expired
        lease. Fair per key: the key with the fewest running jobs first, then the oldest job.
        Never waits (`block` is ignored: `claim_blocks` is False)."""

        def take(db: sqlite3.Connection) -> Job | None:
            now = time.time()
            lanes = "".join(" AND lane != ?" for _ in exclude_lanes)
            # Each key's oldest due job, then the key with the fewest running jobs (one pass each).
            found = db.execute(
                f"""WITH due AS (
                        SELECT key, MIN(seq) AS seq FROM jobs
                        WHERE ((status = 'queued' AND not_before <= ?) OR (status = 'in_progress' AND lease_until < ?))
                        {lanes} GROUP BY key),
                    running AS (
                        SELECT key, COUNT(*) AS n FROM jobs
                        WHERE status = 'in_progress' AND lease_until >= ? GROUP BY key)
                    SELECT due.seq FROM due LEFT JOIN running ON running.key = due.key
                    ORDER BY COALESCE(running.n, 0), due.seq LIMIT 1""",
                (now, now, *exclude_lanes, now),
            ).fetchone()
            if found is not None:
                found = db.execute(f"{_SELECT} WHERE seq = ?", (found[0],)).fetchone()
            if found is None:
                return None
            job = _job(found)
            job.status, job.lease_owner, job.lease_until = "in_progress", owner, now + lease
            job.started_at = job.started_at or now
            job.attempts += 1
            db.execute(
                """UPDATE jobs SET status = 'in_progress', lease_owner = ?, lease_until = ?,
                   started_at = ?, attempts = ? WHERE id = ?""",
                (owner, job.lease_until, job.started_at, job.attempts, job.id),
            )
            return job

        return await self._write(take)

    async def renew(self, job_id: str, owner: str, *, lease: float) -> bool | None:
        """Extend the lease. Returns whether a cancel was requested; None if the job is no longer ours."""

        def extend(db: sqlite3.Connection) -> bool | None:
            cursor = db.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_owner = ? AND status = 'in_progress'",
                (time.time() + lease, job_id, owner),
            )
            if cursor.rowcount == 0:
                return None
            found = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return bool(found and found[0])

        return await self._write(extend)

    async def save_handle(
        self, job_id: str, key: str, handle: dict[str, Any], upstream_id: str | None, *, owner: str | None = None
    ) -> bool:
        """Record an accepted upstream job's handle; with `owner`, only while that worker holds the job."""

        def save(db: sqlite3.Connection) -> bool:
            found = db.execute("SELECT handles, lease_owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if found is None or (owner is not None and found[1] != owner):
                return False
            handles = json.loads(found[0]) if found[0] else {}
            handles[key] = handle
            db.execute(
                "UPDATE jobs SET handles = ?, upstream_request_id = COALESCE(?, upstream_request_id),"
                " provider = COALESCE(?, provider) WHERE id = ?",
                (json.dumps(handles), upstream_id, handle.get("provider"), job_id),
            )
            return True

        return await self._write(save)

    async def save_progress(self, job_id: str, progress: dict[str, Any] | None) -> None:
        """The upstream's report on the running job (None: clear it)."""

        def save(db: sqlite3.Connection) -> None:
            if progress is None:
                db.execute("DELETE FROM job_progress WHERE id = ?", (job_id,))
            else:
                db.execute("INSERT OR REPLACE INTO job_progress (id, progress) VALUES (?, ?)",
                           (job_id, json.dumps(progress)))

        await self._write(save)

    async def progress_of(self, job_id: str) -> dict[str, Any] | None:
        def read(db: sqlite3.Connection) -> dict[str, Any] | None:
            found = db.execute("SELECT progress FROM job_progress WHERE id = ?", (job_id,)).fetchone()
            return None if found is None else dict(json.loads(found[0]))

        return await self._run(read)

    async def requeue(self, job_id: str, owner: str, *, not_before: float, error: dict[str, Any]) -> bool:
        def back(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                """UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_until = 0, not_before = ?, error = ?
                   WHERE id = ? AND lease_owner = ? AND status = 'in_progress' AND cancel_requested = 0""",
                (not_before, json.dumps(error), job_id, owner),
            )
            return cursor.rowcount > 0

        return await self._write(back)

    async def finish(self, job: Job, owner: str | None) -> bool:
        """Write a terminal job (status, result, error, webhook); False if another worker owns it."""
        job.finished_at = job.finished_at or time.time()

        def done(db: sqlite3.Connection) -> bool:
            guard, args = ("lease_owner = ?", [owner]) if owner is not None else ("status = 'queued'", [])
            cursor = db.execute(
                f"""UPDATE jobs SET status = ?, finished_at = ?, provider = ?, upstream_request_id = ?, result = ?,
                    headers = ?, error = ?, lease_owner = NULL, lease_until = 0, webhook = ?, webhook_due = ?
                    WHERE id = ? AND status IN ('queued', 'in_progress') AND {guard}""",
                (
                    job.status, job.finished_at, job.provider, job.upstream_request_id, _dump(job.result),
                    json.dumps(job.headers), _dump(job.error), _dump(job.webhook),
                    job.webhook.get("next_at") if job.webhook else None, job.id, *args,
                ),
            )
            if cursor.rowcount:
                db.execute("DELETE FROM job_requests WHERE id = ?", (job.id,))
            return cursor.rowcount > 0

        return await self._write(done)

    async def unblock(self, owner: str) -> None:
        """Nothing to do: a claim never blocks."""

    async def release(self, owner: str) -> int:
        """Expire the leases of `owner` (a stopping process): the next worker resumes its jobs at once."""

        def expire(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "UPDATE jobs SET lease_until = 0 WHERE lease_owner = ? AND status = 'in_progress'", (owner,)
            )
            return int(cursor.rowcount)

        return await self._write(expire)

    async def cancel_queued(self, job_id: str) -> bool:
        return await cancel_if_queued(self, job_id)

    async def request_cancel(self, job_id: str) -> None:
        await self._write(lambda db: db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,)))

    async def counts(self) -> dict[str, int]:
        rows = await self._run(lambda db: db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        return {str(status): int(count) for status, count in rows}

    async def purge(self, before: float) -> int:
        def delete(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? AND webhook_due IS NULL", (before,)
            )
            db.execute("DELETE FROM job_requests WHERE id NOT IN (SELECT id FROM jobs)")
            return int(cursor.rowcount)

        return await self._write(delete)

    async def due_webhooks(self, now: float, limit: int, *, hold: float) -> list[Job]:
        """Jobs whose webhook is due, taken for `hold` seconds (their due time moves on, so another
        process does not send the same attempt; an attempt that never reports back is retried)."""

        def take(db: sqlite3.Connection) -> list[Job]:
            rows = db.execute(
                f"{_SELECT} WHERE webhook_due IS NOT NULL AND webhook_due <= ? ORDER BY webhook_due LIMIT ?",
                (now, limit),
            ).fetchall()
            jobs = [_job(row) for row in rows]
            db.executemany("UPDATE jobs SET webhook_due = ? WHERE id = ?", [(now + hold, job.id) for job in jobs])
            return jobs

        return await self._write(take)

    async def save_webhook(self, job_id: str, webhook: dict[str, Any], due: float | None) -> None:
        await self._write(
            lambda db: db.execute(
                "UPDATE jobs SET webhook = ?, webhook_due = ? WHERE id = ?", (json.dumps(webhook), due, job_id)
            )
        )

    async def close(self) -> None:
        await self._run(lambda db: db.close())


def _position(db: sqlite3.Connection, job: Job) -> int:
    found = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < ?", (job.seq,)).fetchone()
    return int(found[0])


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _row(job: Job) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name in _COLUMNS:
        value = getattr(job, name)
        if name in _JSON_COLUMNS:
            value = _dump(value) if value is not None else ("{}" if name in ("handles", "headers") else None)
        elif name == "cancel_requested":
            value = int(value)
        row[name] = value
    return row


def _job(row: Sequence[Any]) -> Job:
    values = dict(zip(_COLUMNS, row, strict=True))
    for name in _JSON_COLUMNS:
        raw = values[name]
        values[name] = json.loads(raw) if raw is not None else None
    values["handles"] = values["handles"] or {}
    values["headers"] = values["headers"] or {}
    values["cancel_requested"] = bool(values["cancel_requested"])
    status: JobStatus = values.pop("status")
    return Job(status=status, **values)
