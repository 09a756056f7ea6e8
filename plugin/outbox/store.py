"""Outbox queries: claim due events under a lease, record what happened, list and re-queue.

Rows are written by the ledger (plugin/ledger/store.py: write_records), in the ledger's own
transaction. Everything after that is here, one named function per statement.

Claiming is one UPDATE .. WHERE id IN (SELECT .. FOR UPDATE SKIP LOCKED) RETURNING: on Postgres
several workers claim disjoint rows without waiting on each other; SQLite ignores the locking
clause and serialises writers itself, so the same statement is atomic there too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, bindparam, exists, func, or_, select, text, update
from sqlalchemy.orm import aliased
from sqlmodel import Session

from plugin.ledger.models import Customer, OutboxEvent
from plugin.ledger.rollups import time_units
from plugin.ledger.store import as_utc, has_alert, insert_alert
from plugin.outbox.retry import WAITING, Status, Step
from plugin.rules.rollups import HOUR

_OUTBOX = OutboxEvent.__table__
_CUSTOMERS = Customer.__table__
_ERROR_LIMIT = 500
UNDELIVERED = tuple(status for status in Status if status != Status.DELIVERED)
"""Listed with IN, never `!= delivered`: delivered rows pile up forever and only the index skips them."""
_CLAIM_LOCK = 0x6D74726C  # "mtrl": one Postgres advisory lock id for per-customer claims


@dataclass(frozen=True)
class Claimed:
    """An event this worker now holds under its lease."""

    id: str
    customer_id: str
    value_ucr: int
    occurred_at: datetime
    attempts: int
    """Including the attempt about to be made."""
    first_attempt_at: datetime
    uncertain: bool
    requeues: int = 0


def claim(engine: Engine, worker: str, *, limit: int, now: datetime, lease: timedelta,
          one_customer_per_worker: bool = False, max_customers: int | None = None) -> list[Claimed]:
    """Take up to `limit` due events: pending or held ones whose time has come, and ones whose
    worker's lease ran out (that worker died mid-send, so the event is now `uncertain`).

    `one_customer_per_worker` skips customers another worker is sending right now, for sinks that
    forbid concurrent calls per customer (Stripe v1), and takes events of at most `max_customers`
    customers (the longest-waiting first), so several workers share the customers between them
    instead of the first one taking them all. On Postgres the claim then takes a transaction
    advisory lock, so two claims cannot both see a customer as free.
    """
    due = or_(
        and_(_OUTBOX.c.status.in_([Status.PENDING, Status.HELD]), _OUTBOX.c.next_attempt_at <= now),
        and_(_OUTBOX.c.status == Status.SENDING, _OUTBOX.c.lease_until < now),
    )
    candidates = select(_OUTBOX.c.id).where(due)
    if one_customer_per_worker:
        other = aliased(_OUTBOX)
        busy_elsewhere = exists().where(
            other.c.customer_id == _OUTBOX.c.customer_id, other.c.status == Status.SENDING,
            other.c.lease_until >= now, other.c.claimed_by != worker,
        )
        customers = (
            select(_OUTBOX.c.customer_id).where(due, ~busy_elsewhere).group_by(_OUTBOX.c.customer_id)
            .order_by(func.min(_OUTBOX.c.next_attempt_at), _OUTBOX.c.customer_id).limit(max_customers or limit)
        )
        candidates = candidates.where(_OUTBOX.c.customer_id.in_(customers.scalar_subquery()))
    candidates = (candidates.order_by(_OUTBOX.c.next_attempt_at, _OUTBOX.c.id).limit(limit)
                  .with_for_update(skip_locked=True))
    statement = (
        update(_OUTBOX)
        .where(_OUTBOX.c.id.in_(candidates.scalar_subquery()))
        .values(
            status=Status.SENDING, claimed_by=worker, lease_until=now + lease, attempts=_OUTBOX.c.attempts + 1,
            first_attempt_at=func.coalesce(_OUTBOX.c.first_attempt_at, now),
            uncertain=or_(_OUTBOX.c.uncertain, _OUTBOX.c.status == Status.SENDING),
        )
        .returning(_OUTBOX.c.id, _OUTBOX.c.customer_id, _OUTBOX.c.value_ucr, _OUTBOX.c.occurred_at,
                   _OUTBOX.c.attempts, _OUTBOX.c.first_attempt_at, _OUTBOX.c.uncertain, _OUTBOX.c.requeues)
    )
    with engine.begin() as connection:
        if one_customer_per_worker and engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": _CLAIM_LOCK})
        rows = connection.execute(statement).all()
    claimed = [
        Claimed(row.id, row.customer_id, row.value_ucr, as_utc(row.occurred_at), row.attempts,
                as_utc(row.first_attempt_at), bool(row.uncertain), row.requeues)
        for row in rows
    ]
    claimed.sort(key=lambda event: (event.occurred_at, event.id))
    return claimed


def stripe_customer_ids(engine: Engine, customer_ids: Iterable[str]) -> dict[str, str | None]:
    """Each customer's Stripe id (None when it has none yet)."""
    wanted = sorted(set(customer_ids))
    if not wanted:
        return {}
    with engine.connect() as connection:
        rows = connection.execute(
            select(_CUSTOMERS.c.id, _CUSTOMERS.c.stripe_customer_id).where(_CUSTOMERS.c.id.in_(wanted))
        ).all()
    found = dict(rows)
    return {customer_id: found.get(customer_id) for customer_id in wanted}


_RECORD = (
    update(_OUTBOX)
    .where(_OUTBOX.c.id == bindparam("event_id"), _OUTBOX.c.claimed_by == bindparam("worker"),
           _OUTBOX.c.status == Status.SENDING)
    .values(status=bindparam("new_status"), next_attempt_at=bindparam("retry_at"), last_error=bindparam("error"),
            uncertain=bindparam("new_uncertain"), lease_until=None)
)


def record(engine: Engine, worker: str, steps: Sequence[tuple[Claimed, Step]], now: datetime) -> None:
    """Store each event's next step, in one transaction.

    Only rows this worker still holds are touched: if its lease ran out and another worker took an
    event over, that worker's answer wins (a delivery is a delivery either way, and Stripe dedupes).
    Deliveries, the common case, are one UPDATE per batch; other steps one row each.
    """
    if not steps:
        return
    delivered = [event.id for event, step in steps if step.status == Status.DELIVERED]
    others = [
        {"event_id": event.id, "worker": worker, "new_status": step.status,
         "retry_at": step.next_attempt_at or now, "error": (step.reason or None) and step.reason[:_ERROR_LIMIT],
         "new_uncertain": step.uncertain}
        for event, step in steps if step.status != Status.DELIVERED
    ]
    with engine.begin() as connection:
        if delivered:
            connection.execute(
                update(_OUTBOX)
                .where(_OUTBOX.c.id.in_(delivered), _OUTBOX.c.claimed_by == worker, _OUTBOX.c.status == Status.SENDING)
                .values(status=Status.DELIVERED, delivered_at=now, lease_until=None, last_error=None)
            )
        if others:
            connection.execute(_RECORD, others)


def list_events(engine: Engine, *, status: str | None = None, customer_id: str | None = None,
                limit: int = 100) -> list[OutboxEvent]:
    """Events, oldest first; `status` None lists every event that has not been delivered."""
    query = select(OutboxEvent).order_by(OutboxEvent.occurred_at, OutboxEvent.id).limit(limit)
    query = query.where(OutboxEvent.status == status) if status else query.where(OutboxEvent.status.in_(UNDELIVERED))
    if customer_id is not None:
        query = query.where(OutboxEvent.customer_id == customer_id)
    with Session(engine) as session:
        return list(session.exec(query).scalars())


# ---------------------------------------------------------------------- reconciliation

IN_FLIGHT = (Status.PENDING, Status.SENDING, Status.HELD, Status.UNKNOWN)
"""On their way to the sink (or not known to have arrived): not divergence yet. Dead letters are."""


def hourly_totals(engine: Engine, start: datetime, end: datetime, customer_id: str | None = None
                  ) -> dict[str, dict[int, dict[str, int]]]:
    """customer -> hour (whole hours since the epoch) -> status -> µcr of its events that occurred in
    [start, end): every event the ledger meant for the sink, one per metered ledger row."""
    with engine.connect() as connection:
        hour = time_units(_OUTBOX.c.occurred_at, HOUR, connection.dialect.name).label("hour")
        query = (select(_OUTBOX.c.customer_id, hour, _OUTBOX.c.status, func.sum(_OUTBOX.c.value_ucr))
                 .where(_OUTBOX.c.occurred_at >= start, _OUTBOX.c.occurred_at < end)
                 .group_by(_OUTBOX.c.customer_id, hour, _OUTBOX.c.status))
        if customer_id is not None:
            query = query.where(_OUTBOX.c.customer_id == customer_id)
        totals: dict[str, dict[int, dict[str, int]]] = {}
        for customer, hour_number, status, ucr in connection.execute(query):
            totals.setdefault(customer, {}).setdefault(int(hour_number), {})[status] = int(ucr)
    return totals


def unknown_in(engine: Engine, start: datetime, end: datetime, customer_id: str | None = None
               ) -> list[tuple[str, str, datetime, int]]:
    """(id, customer, occurred_at, µcr) of the `unknown` events that occurred in [start, end)."""
    query = (select(_OUTBOX.c.id, _OUTBOX.c.customer_id, _OUTBOX.c.occurred_at, _OUTBOX.c.value_ucr)
             .where(_OUTBOX.c.status == Status.UNKNOWN, _OUTBOX.c.occurred_at >= start, _OUTBOX.c.occurred_at < end)
             .order_by(_OUTBOX.c.occurred_at, _OUTBOX.c.id))
    if customer_id is not None:
        query = query.where(_OUTBOX.c.customer_id == customer_id)
    with engine.connect() as connection:
        return [(row.id, row.customer_id, as_utc(row.occurred_at), row.value_ucr) for row in connection.execute(query)]


def settle_landed(engine: Engine, ids: Sequence[str], now: datetime) -> int:
    """`unknown` events that reconciliation found in Stripe's totals: delivered after all."""
    if not ids:
        return 0
    statement = update(_OUTBOX).where(_OUTBOX.c.id.in_(list(ids)), _OUTBOX.c.status == Status.UNKNOWN).values(
        status=Status.DELIVERED, delivered_at=now, claimed_by=None, lease_until=None,
        last_error="settled by reconciliation: Stripe's totals for its hour hold it",
    )
    with engine.begin() as connection:
        return connection.execute(statement).rowcount


REQUEUABLE = (Status.DEAD, Status.HELD)
"""What `outbox retry` takes back. UNKNOWN only with force: resending it may bill twice."""


def requeue(engine: Engine, *, now: datetime, ids: Sequence[str] = (), all_dead: bool = False,
            force: bool = False) -> int:
    """Make events due now again; returns how many were re-queued.

    Attempts and first_attempt_at are reset: a re-queued event is a fresh delivery, and a forced
    `unknown` one is the operator's explicit decision to send again. `requeues` counts up, so the
    resend gets a new Idempotency-Key: its parameters may differ (e.g. a corrected Stripe customer),
    and Stripe refuses a reused key with other parameters. The identifier stays the same, so
    Stripe's identifier dedupe still stops a double count.
    """
    statuses = [*REQUEUABLE, Status.UNKNOWN] if force else list(REQUEUABLE)
    condition = _OUTBOX.c.status == Status.DEAD if all_dead else and_(
        _OUTBOX.c.id.in_(list(ids)), _OUTBOX.c.status.in_(statuses)
    )
    statement = update(_OUTBOX).where(condition).values(
        status=Status.PENDING, next_attempt_at=now, attempts=0, first_attempt_at=None, uncertain=False,
        claimed_by=None, lease_until=None, requeues=_OUTBOX.c.requeues + 1,
    )
    with engine.begin() as connection:
        return connection.execute(statement).rowcount


def release_held(engine: Engine, customer_id: str, now: datetime) -> int:
    """A customer just got its sink id: its held events are due now."""
    statement = update(_OUTBOX).where(_OUTBOX.c.customer_id == customer_id, _OUTBOX.c.status == Status.HELD).values(
        status=Status.PENDING, next_attempt_at=now,
    )
    with engine.begin() as connection:
        return connection.execute(statement).rowcount


def record_sink_rejections(engine: Engine, rejections: Sequence[tuple[str, str]], *, alert_kind: str,
                           alert_subject: str, alert_message: str) -> int:
    """Events the sink accepted and rejected later (Stripe's v2 error reports) become dead letters, and
    one alert says so; in one transaction. A report delivered twice changes nothing the second time.
    Returns how many events were marked."""
    with engine.begin() as connection:
        if has_alert(connection, alert_kind, alert_subject):
            return 0
        marked = 0
        for event_id, reason in rejections:
            marked += connection.execute(
                update(_OUTBOX).where(_OUTBOX.c.id == event_id, _OUTBOX.c.status != Status.DEAD)
                .values(status=Status.DEAD, last_error=reason[:_ERROR_LIMIT], lease_until=None, delivered_at=None)
            ).rowcount
        insert_alert(connection, alert_kind, alert_message, subject_id=alert_subject)
    return marked


@dataclass(frozen=True)
class QueueStats:
    """Queue health: depth per status (delivered excluded: it only grows) and the oldest waiting event."""

    depth: dict[str, int]
    oldest_waiting_at: datetime | None

    def oldest_age_seconds(self, now: datetime) -> float:
        return 0.0 if self.oldest_waiting_at is None else max(0.0, (now - self.oldest_waiting_at).total_seconds())


def stats(engine: Engine) -> QueueStats:
    with engine.connect() as connection:
        rows = connection.execute(
            select(_OUTBOX.c.status, func.count(), func.min(_OUTBOX.c.occurred_at))
            .where(_OUTBOX.c.status.in_(UNDELIVERED)).group_by(_OUTBOX.c.status)
        ).all()
    depth = {status.value: 0 for status in UNDELIVERED}
    oldest = None
    for status, count, first in rows:
        depth[status] = int(count)
        if status in WAITING and first is not None:
            first = as_utc(first)
            oldest = first if oldest is None else min(oldest, first)
    return QueueStats(depth, oldest)
