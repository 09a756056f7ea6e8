"""SQLModel tables: customers, API keys, the ledger, its outbox, and alerts.

Money columns are BIGINT micro-units (µcr, µUSD). Timestamps are UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, DateTime, Index, Text, false
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(**kwargs) -> Column:
    return Column(DateTime(timezone=True), nullable=False, **kwargs)


class Customer(SQLModel, table=True):
    __tablename__ = "customers"

    id: str = Field(primary_key=True, max_length=64)
    plan: str = Field(max_length=64)
    stripe_customer_id: str | None = Field(default=None, max_length=255)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    period_anchor: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    """Where the customer's monthly billing periods start (its subscription's start); None = calendar months."""
    terms: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    """Per-customer terms over the plan's (enterprise deals), as JSON: see plugin.rules.plans.TermsOverride."""
    grandfathered_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    """Kept on its flat plan for good (`meterline migrate grandfather`): metered for visibility, never billed
    overage, its events never sent to the sink."""
    flat_usd: str | None = Field(default=None, max_length=32)
    """The flat monthly price it paid before moving to metered billing (exact decimal string): the
    first-invoice safety credit compares against it."""
    scheduled_plan: str | None = Field(default=None, max_length=64)
    """The plan a Stripe subscription schedule moves it to at its next renewal (`migrate schedule`)."""
    schedule_id: str | None = Field(default=None, max_length=255)
    migrated_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    """When Stripe said its scheduled move to metered billing took effect."""
    first_metered_invoice: str | None = Field(default=None, max_length=255)
    """The first invoice of its metered billing: the one the safety credit looked at (once, credit or not)."""


class ApiKey(SQLModel, table=True):
    """A customer key. Only its SHA-256 is stored; `id` is the public handle shown in listings."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=32)
    customer_id: str = Field(foreign_key="customers.id", index=True, max_length=64)
    key_hash: str = Field(unique=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    revoked_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class LedgerEntry(SQLModel, table=True):
    """One row per billable call (final success only). Cache hits appear with credits_ucr = 0."""

    __tablename__ = "ledger"
    __table_args__ = (Index("ix_ledger_customer_created", "customer_id", "created_at"),)

    id: str = Field(primary_key=True, max_length=100)
    customer_id: str = Field(max_length=64)
    member: str = Field(default="-", max_length=255)
    action: str = Field(default="-", max_length=255)
    model: str = Field(max_length=255)
    provider: str = Field(default="-", max_length=64)
    prompt_tokens: int = Field(default=0, sa_type=BigInteger)
    completion_tokens: int = Field(default=0, sa_type=BigInteger)
    cached_tokens: int = Field(default=0, sa_type=BigInteger)
    reasoning_tokens: int = Field(default=0, sa_type=BigInteger)
    credits_ucr: int = Field(default=0, sa_type=BigInteger)
    provider_cost_uusd: int = Field(default=0, sa_type=BigInteger)
    cache_hit: bool = False
    saved_ucr: int = Field(default=0, sa_type=BigInteger)
    stream: bool = False
    usage_source: str = Field(default="provider", max_length=16)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    price_version: int | None = Field(default=None, nullable=True)
    """The pricing changelog's version the row was priced with (None: priced before the changelog existed)."""
    history: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    """Imported history (`meterline ledger import`): counted like any row, never sent to a sink."""


class OutboxEvent(SQLModel, table=True):
    """A meter event waiting for delivery, written in the same transaction as its ledger row.

    The id is the ledger id: it becomes the sink's event identifier (and Stripe's Idempotency-Key),
    so a resend is a no-op. Life cycle (see plugin/outbox/retry.py):
    pending -> sending (claimed under a lease) -> delivered | pending (retry) | held | dead | unknown.
    """

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_status_due", "status", "next_attempt_at"),)

    id: str = Field(primary_key=True, max_length=100)
    customer_id: str = Field(max_length=64)
    value_ucr: int = Field(sa_type=BigInteger)
    occurred_at: datetime = Field(sa_column=_ts())
    status: str = Field(default="pending", max_length=16)
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    first_attempt_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    """When the first send was tried: the sink's dedupe window counts from here."""
    uncertain: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    """A send may have reached the sink without us learning the answer (timeout, 5xx, crash mid-send)."""
    requeues: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    """How often an operator re-queued it: a fresh Idempotency-Key each time (see plugin/sinks/stripe.py)."""
    claimed_by: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    delivered_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class Alert(SQLModel, table=True):
    """Something an operator must look at (e.g. tokens flowed but nothing was billed)."""

    __tablename__ = "alerts"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=64, index=True)
    customer_id: str | None = Field(default=None, max_length=64)
    subject_id: str | None = Field(default=None, max_length=100)
    message: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    acknowledged_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    """When an operator acknowledged it; None = open."""


class CounterRow(SQLModel, table=True):
    """The embedded counter store: a customer's used and reserved µcr in one billing period."""

    __tablename__ = "counters"

    customer_id: str = Field(primary_key=True, max_length=64)
    period: str = Field(primary_key=True, max_length=16)
    """The period's start, in Unix seconds."""
    used_ucr: int = Field(default=0, sa_type=BigInteger)
    reserved_ucr: int = Field(default=0, sa_type=BigInteger)


class ReservationRow(SQLModel, table=True):
    """A request's reservation, until it settles, is released, or expires."""

    __tablename__ = "reservations"
    __table_args__ = (Index("ix_reservations_account", "customer_id", "period", "expires_at"),)

    id: str = Field(primary_key=True, max_length=100)
    customer_id: str = Field(max_length=64)
    period: str = Field(max_length=16)
    ucr: int = Field(sa_type=BigInteger)
    expires_at: datetime = Field(sa_column=_ts())


class CustomerLimits(SQLModel, table=True):
    """What a customer (or the operator for it) allowed: soft thresholds, a hard limit, an overage block."""

    __tablename__ = "customer_limits"

    customer_id: str = Field(primary_key=True, max_length=64)
    soft_thresholds_pct: str | None = Field(default=None, max_length=200)
    """JSON list of percentages; None = the configured default."""
    hard_limit_ucr: int | None = Field(default=None, sa_type=BigInteger)
    hard_limit_usd: str | None = Field(default=None, max_length=32)
    """A hard limit in currency (exact decimal string), instead of `hard_limit_ucr`."""
    block_overage: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    notify_email: str | None = Field(default=None, max_length=254)
    notify_webhook_url: str | None = Field(default=None, max_length=2000)
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    updated_by: str = Field(default="-", max_length=100)


class Revision(SQLModel, table=True):
    """A counter that database triggers bump on every change to a group of tables (plugin/ledger/
    revisions.py), so a reader that keeps those tables' rows can tell in one read whether to read them again."""

    __tablename__ = "revisions"

    name: str = Field(primary_key=True, max_length=64)
    revision: int = Field(default=0, sa_type=BigInteger)


class Switch(SQLModel, table=True):
    """An operator-wide switch, e.g. `block_overage` for every customer at once."""

    __tablename__ = "switches"

    name: str = Field(primary_key=True, max_length=64)
    enabled: bool = False
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    updated_by: str = Field(default="-", max_length=100)


class SoftLimitNotice(SQLModel, table=True):
    """A soft-limit threshold a customer crossed in a period: the primary key makes it fire once."""

    __tablename__ = "soft_limit_notices"

    customer_id: str = Field(primary_key=True, max_length=64)
    period: str = Field(primary_key=True, max_length=16)
    threshold_pct: int = Field(primary_key=True)
    fired_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class BreakerRow(SQLModel, table=True):
    """A customer's circuit breaker (plugin.rules.breaker.BreakerState); no row = closed."""

    __tablename__ = "breakers"

    customer_id: str = Field(primary_key=True, max_length=64)
    status: str = Field(default="closed", max_length=16)
    since: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    reason: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))
    by: str = Field(default="meterline", max_length=100)
    trickle_started: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    trickle_used: int = 0


class BreakerEvent(SQLModel, table=True):
    """The audit log of breaker transitions: who moved which breaker, when, and why."""

    __tablename__ = "breaker_events"
    __table_args__ = (Index("ix_breaker_events_customer", "customer_id", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(max_length=64)
    before: str = Field(max_length=16)
    after: str = Field(max_length=16)
    at: datetime = Field(sa_column=_ts())
    by: str = Field(max_length=100)
    why: str = Field(sa_column=Column(Text, nullable=False))


class SpendHour(SQLModel, table=True):
    """The embedded counter store: µcr a customer was billed in one clock hour (for the breaker)."""

    __tablename__ = "spend_hours"

    customer_id: str = Field(primary_key=True, max_length=64)
    hour: int = Field(primary_key=True, sa_type=BigInteger)
    """Hours since the Unix epoch."""
    ucr: int = Field(default=0, sa_type=BigInteger)


class RateWindow(SQLModel, table=True):
    """The embedded counter store: requests a customer made in one fixed rate-limit window."""

    __tablename__ = "rate_windows"

    customer_id: str = Field(primary_key=True, max_length=64)
    window: int = Field(primary_key=True, sa_type=BigInteger)
    """Window index: Unix ms // window length."""
    requests: int = 0


_CLUSTERED = {"sqlite_with_rowid": False}
"""SQLite: the rollups are stored in their primary key's order (WITHOUT ROWID), so the ledger's commit
updates one B-tree per rollup table instead of a table and its key's index: fewer pages per commit."""


class UsageHour(SQLModel, table=True):
    """Rollup for usage reads: what a customer was billed in one clock hour (UTC). Written in the
    ledger's own transaction, so it always equals the ledger summed over that hour."""

    __tablename__ = "usage_hours"
    __table_args__ = (Index("ix_usage_hours_hour", "hour", "customer_id"), _CLUSTERED)

    customer_id: str = Field(primary_key=True, max_length=64)
    hour: int = Field(primary_key=True, sa_type=BigInteger)
    """Hours since the Unix epoch."""
    credits_ucr: int = Field(default=0, sa_type=BigInteger)
    requests: int = Field(default=0, sa_type=BigInteger)
    saved_ucr: int = Field(default=0, sa_type=BigInteger)


class UsageDay(SQLModel, table=True):
    """Rollup for usage reads: a customer's usage on one UTC day by model, by action and by member
    (`dimension` names which; every ledger row counts once in each). Written with the ledger row."""

    __tablename__ = "usage_days"
    __table_args__ = (_CLUSTERED,)

    customer_id: str = Field(primary_key=True, max_length=64)
    day: int = Field(primary_key=True)
    """Days since the Unix epoch."""
    dimension: str = Field(primary_key=True, max_length=8)
    """`model`, `action` or `member`."""
    name: str = Field(primary_key=True, max_length=255)
    credits_ucr: int = Field(default=0, sa_type=BigInteger)
    requests: int = Field(default=0, sa_type=BigInteger)
    saved_ucr: int = Field(default=0, sa_type=BigInteger)


class ReconciliationRun(SQLModel, table=True):
    """One comparison of the ledger with Stripe's meter summaries (`meterline reconcile`, the proxy's
    timer): what `GET /reconciliation`, the usage API's `stripe` field and the console show."""

    __tablename__ = "reconciliation_runs"

    id: int | None = Field(default=None, primary_key=True)
    checked_at: datetime = Field(sa_column=_ts())
    scope: str = Field(max_length=100)
    """`all`, or the one customer it was run for."""
    report: str = Field(sa_column=Column(Text, nullable=False))
    """The run's JSON, as DESIGN "Contract: reconciliation" shows it."""


class InvoiceRecord(SQLModel, table=True):
    """A Stripe invoice meterline saw finalized (`invoice.finalized`), or a draft its spike guard
    flagged (`invoice.created`): the guard's "previous invoice", `GET /invoices`, the console's screen 5."""

    __tablename__ = "invoices"

    id: str = Field(primary_key=True, max_length=255)
    customer_id: str | None = Field(default=None, max_length=64, index=True)
    """meterline's id (None: a Stripe customer meterline does not know)."""
    stripe_customer_id: str = Field(max_length=255)
    status: str = Field(max_length=32)
    total_cents: int = Field(sa_type=BigInteger)
    currency: str = Field(max_length=8)
    period_start: datetime = Field(sa_column=_ts())
    period_end: datetime = Field(sa_column=_ts())
    finalized_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    """None while a draft."""
    held: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    """A draft the spike guard stopped from finalizing (`invoices approve` releases it)."""


class StripeEventSeen(SQLModel, table=True):
    """Webhook events already processed: Stripe delivers at least once, meterline acts once."""

    __tablename__ = "stripe_events"

    id: str = Field(primary_key=True, max_length=255)
    type: str = Field(max_length=100)
    received_at: datetime = Field(sa_column=_ts())


class PricingVersion(SQLModel, table=True):
    """One entry of the pricing changelog (`meterline pricing change`): the plans and pricing in force
    from `at`, what changed since the previous version, and why. Version 1 is the baseline."""

    __tablename__ = "pricing_versions"

    version: int = Field(primary_key=True)
    at: datetime = Field(sa_column=_ts())
    reason: str = Field(sa_column=Column(Text, nullable=False))
    snapshot: str = Field(sa_column=Column(Text, nullable=False))
    """meterline.yaml's `pricing`, `prices` and `plans` as canonical JSON (decimal strings): what a
    reprice rebuilds the version's price book from."""
    changes: str = Field(sa_column=Column(Text, nullable=False))
    """JSON list of {field, old, new} since the previous version (empty for the baseline)."""
    customers_affected: int = 0
