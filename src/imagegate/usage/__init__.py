"""Usage and cost per client key: the price table (`PriceTable`), the counters (`UsageLedger`:
`MemoryLedger` or `RedisLedger`) and `GET /v1/usage` (`router`)."""

from imagegate.usage.ledger import MemoryLedger, RedisLedger, UsageLedger, UsageTotals
from imagegate.usage.prices import COST_HEADER, PriceTable
from imagegate.usage.routes import router

__all__ = ["COST_HEADER", "MemoryLedger", "PriceTable", "RedisLedger", "UsageLedger", "UsageTotals", "router"]
