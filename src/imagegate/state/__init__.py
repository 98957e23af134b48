"""Shared state: the Redis connection every instance shares (limits, idempotency, usage, jobs)."""
