"""A customer's move off its flat plan, as the customers table keeps it (plugin/services/plan_moves.py):
grandfathered for good, or scheduled at Stripe, then migrated, then its first metered invoice looked at."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction

from sqlalchemy import Engine, select, update

from plugin.ledger.models import Customer
from plugin.ledger.store import as_utc, insert_alert

SAFETY_ALERT = "safety_credit"

_CUSTOMERS = Customer.__table__
_COLUMNS = (_CUSTOMERS.c.id, _CUSTOMERS.c.plan, _CUSTOMERS.c.stripe_customer_id, _CUSTOMERS.c.grandfathered_at,
            _CUSTOMERS.c.flat_usd, _CUSTOMERS.c.scheduled_plan, _CUSTOMERS.c.schedule_id, _CUSTOMERS.c.migrated_at,
            _CUSTOMERS.c.first_metered_invoice)


@dataclass(frozen=True)
class MoveState:
    customer_id: str
    plan: str
    stripe_customer_id: str | None
    grandfathered_at: datetime | None
    flat_usd: Fraction | None
    """The flat monthly price it paid before the move (what the safety credit caps the first invoice at)."""
    scheduled_plan: str | None
    """The plan a Stripe schedule moves it to at its next renewal; None once it moved (or never scheduled)."""
    schedule_id: str | None
    migrated_at: datetime | None
    first_metered_invoice: str | None


def _state(row) -> MoveState:
    (customer_id, plan, stripe_id, grandfathered_at, flat_usd, scheduled_plan, schedule_id, migrated_at,
     first_invoice) = row
    return MoveState(customer_id, plan, stripe_id, None if grandfathered_at is None else as_utc(grandfathered_at),
                     None if flat_usd is None else Fraction(flat_usd), scheduled_plan, schedule_id,
                     None if migrated_at is None else as_utc(migrated_at), first_invoice)


def state(engine: Engine, customer_id: str) -> MoveState | None:
    with engine.connect() as connection:
        row = connection.execute(select(*_COLUMNS).where(_CUSTOMERS.c.id == customer_id)).first()
    return None if row is None else _state(row)


def state_of_stripe(engine: Engine, stripe_customer_id: str) -> MoveState | None:
    """The move of the customer linked to this Stripe customer, if meterline knows one."""
    with engine.connect() as connection:
        row = connection.execute(select(*_COLUMNS).where(_CUSTOMERS.c.stripe_customer_id == stripe_customer_id)
                                 ).first()
    return None if row is None else _state(row)


def grandfather(engine: Engine, customer_id: str, at: datetime) -> None:
    """Grandfathered from `at`, unless it already was (its first date stays)."""
    with engine.begin() as connection:
        connection.execute(update(_CUSTOMERS).where(_CUSTOMERS.c.id == customer_id, _CUSTOMERS.c.grandfathered_at.is_(None))
                           .values(grandfathered_at=at))


def record_schedule(engine: Engine, customer_id: str, plan: str, schedule_id: str, flat_usd: str) -> None:
    """A Stripe schedule moves it to `plan` at its next renewal; `flat_usd` is what it paid until then."""
    with engine.begin() as connection:
        connection.execute(update(_CUSTOMERS).where(_CUSTOMERS.c.id == customer_id).values(
            scheduled_plan=plan, schedule_id=schedule_id, flat_usd=flat_usd, migrated_at=None,
            first_metered_invoice=None))


def record_arrival(engine: Engine, customer_id: str, at: datetime) -> bool:
    """Its scheduled move took effect at `at` (the new phase's start); False when none was pending."""
    with engine.begin() as connection:
        return connection.execute(update(_CUSTOMERS).where(
            _CUSTOMERS.c.id == customer_id, _CUSTOMERS.c.scheduled_plan.is_not(None)).values(
            scheduled_plan=None, migrated_at=at)).rowcount == 1


def record_first_invoice(engine: Engine, customer_id: str, invoice_id: str, alert: str | None) -> bool:
    """`invoice_id` is its first metered invoice, looked at; with the `alert` (a `safety_credit`, subject the
    invoice) in the same transaction. False, and nothing recorded, when another invoice already was."""
    with engine.begin() as connection:
        claimed = connection.execute(update(_CUSTOMERS).where(
            _CUSTOMERS.c.id == customer_id, _CUSTOMERS.c.first_metered_invoice.is_(None)).values(
            first_metered_invoice=invoice_id)).rowcount == 1
        if claimed and alert is not None:
            insert_alert(connection, SAFETY_ALERT, alert, customer_id=customer_id, subject_id=invoice_id)
    return claimed
