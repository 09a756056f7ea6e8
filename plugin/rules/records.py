"""The values of what one billed call writes: its ledger row and its billing record.

Plain frozen dataclasses that the rules build (plugin/rules/metering.py) and the ledger writes
(plugin/ledger/store.py): they live with the rules so that metering imports nothing that does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class LedgerRow:
    """The values of one ledger row, as written. A plain dataclass: the hot path builds one per call."""

    id: str
    customer_id: str
    model: str
    created_at: datetime
    member: str = "-"
    action: str = "-"
    provider: str = "-"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    credits_ucr: int = 0
    provider_cost_uusd: int = 0
    cache_hit: bool = False
    saved_ucr: int = 0
    stream: bool = False
    usage_source: str = "provider"
    price_version: int | None = None
    """The pricing changelog's version this row was priced with (plugin/services/pricing.py)."""
    history: bool = False
    """Imported by `meterline ledger import`: usage from before meterline, never sent to a sink."""


@dataclass(frozen=True)
class BillingRecord:
    """Everything written for one billed call: its ledger row, its meter event, maybe an alert."""

    entry: LedgerRow
    alert: str | None = None
    meter: bool = True
    """False for legacy flat-rate plans: in the ledger, never sent to the sink."""
