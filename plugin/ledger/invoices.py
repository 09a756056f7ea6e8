"""Invoices meterline saw finalized at Stripe, and the webhook events it has processed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, select
from sqlalchemy.exc import IntegrityError

from plugin.ledger.models import Customer, InvoiceRecord, StripeEventSeen
from plugin.ledger.store import as_utc

_INVOICES = InvoiceRecord.__table__
_EVENTS = StripeEventSeen.__table__
_CUSTOMERS = Customer.__table__
FINALIZED = ("open", "paid")
"""What counts as a finalized invoice for the spike guard (a draft, void or uncollectible does not)."""


def claim_event(engine: Engine, event_id: str, kind: str, now: datetime) -> bool:
    """Mark a webhook event as being processed; False when it was processed (or is being) already."""
    try:
        with engine.begin() as connection:
            connection.execute(_EVENTS.insert(), {"id": event_id, "type": kind, "received_at": now})
    except IntegrityError:
        return False
    return True


def release_event(engine: Engine, event_id: str) -> None:
    """Processing failed: let Stripe's next delivery of the event try again."""
    with engine.begin() as connection:
        connection.execute(delete(_EVENTS).where(_EVENTS.c.id == event_id))


def customer_of(engine: Engine, stripe_customer_id: str) -> str | None:
    """meterline's customer linked to this Stripe customer, if any."""
    with engine.connect() as connection:
        found = connection.execute(select(_CUSTOMERS.c.id).where(
            _CUSTOMERS.c.stripe_customer_id == stripe_customer_id)).first()
    return None if found is None else found[0]


def record(engine: Engine, row: dict[str, Any]) -> None:
    """Keep (or update) a finalized invoice; `row` has InvoiceRecord's columns."""
    with engine.begin() as connection:
        updated = connection.execute(_INVOICES.update().where(_INVOICES.c.id == row["id"]).values(**row)).rowcount
        if not updated:
            connection.execute(_INVOICES.insert(), row)


def previous_finalized(engine: Engine, stripe_customer_id: str, before_invoice: str) -> dict[str, Any] | None:
    """The customer's most recent finalized invoice other than `before_invoice`, as recorded."""
    query = (select(_INVOICES).where(_INVOICES.c.stripe_customer_id == stripe_customer_id,
                                     _INVOICES.c.id != before_invoice, _INVOICES.c.status.in_(FINALIZED))
             .order_by(_INVOICES.c.period_end.desc(), _INVOICES.c.finalized_at.desc()).limit(1))
    with engine.connect() as connection:
        found = connection.execute(query).mappings().first()
    return None if found is None else _json(found)


def set_held(engine: Engine, invoice_id: str, held: bool) -> None:
    with engine.begin() as connection:
        connection.execute(_INVOICES.update().where(_INVOICES.c.id == invoice_id).values(held=held))


def listed(engine: Engine, customer_id: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """Recorded invoices (finalized ones, and drafts the guard flagged), newest period first."""
    query = select(_INVOICES).order_by(_INVOICES.c.period_end.desc(), _INVOICES.c.id).limit(limit)
    if customer_id is not None:
        query = query.where(_INVOICES.c.customer_id == customer_id)
    with engine.connect() as connection:
        return [_json(row) for row in connection.execute(query).mappings()]


def _json(row) -> dict[str, Any]:
    return {"id": row["id"], "customer_id": row["customer_id"], "stripe_customer_id": row["stripe_customer_id"],
            "status": row["status"], "total_cents": row["total_cents"], "currency": row["currency"],
            "period_start": as_utc(row["period_start"]).isoformat(), "period_end": as_utc(row["period_end"]).isoformat(),
            "finalized_at": None if row["finalized_at"] is None else as_utc(row["finalized_at"]).isoformat(),
            "held": bool(row["held"])}
