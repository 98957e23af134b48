"""`Idempotency-Key`: the same key (per client key) and the same request return the stored response.

`Idempotency.run(scope, key, request, work)` runs `work` once per (scope, key): a repeat gets the
stored response (`idempotent-replayed: true`, no upstream job), a repeat that arrives while the
first runs waits for it, a different request under the same key is 409 `idempotency_key_reused`,
and a failure stores nothing (the retry runs again). Records live in `MemoryStore` or `RedisStore`;
output image bytes go to the image storage, so a record stays small (`codec`).
"""

from imagegate.idempotency.codec import fingerprint
from imagegate.idempotency.guard import IDEMPOTENCY_HEADER, Idempotency, IdempotencyKeyReused
from imagegate.idempotency.store import IdempotencyStore, MemoryStore, Record, RedisStore

__all__ = [
    "IDEMPOTENCY_HEADER",
    "Idempotency",
    "IdempotencyKeyReused",
    "IdempotencyStore",
    "MemoryStore",
    "Record",
    "RedisStore",
    "fingerprint",
]
