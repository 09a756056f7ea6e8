"""Customer controls in the database: limits, terms and anchors, global switches, soft-limit
notices, and circuit breakers with their audit log.

Everything a request's admission needs about a customer is read at once (`load_profile`) and
remembered briefly by plugin.ledger.directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction

from sqlalchemy import Engine, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from plugin.ledger.models import (
    BreakerEvent,
    BreakerRow,
    Customer,
    CustomerLimits,
    SoftLimitNotice,
    Switch,
    utcnow,
)
from plugin.ledger.store import StoreError, as_utc
from plugin.rules.breaker import CLOSED, BreakerState, BreakerStatus, Transition
from plugin.rules.limits import NO_LIMITS, Limits
from plugin.settings import TermsOverride

_INSERT = {"postgresql": pg_insert, "sqlite": sqlite_insert}

GLOBAL_OVERAGE_BLOCK = "block_overage"
"""The operator's switch that blocks overage for every customer (PUT /meterline/v1/overage-block)."""

LIMIT_FIELDS = ("soft_thresholds_pct", "hard_limit_ucr", "hard_limit_usd", "block_overage", "notify_email",
                "notify_webhook_url")


@dataclass(frozen=True)
class Profile:
    """What admission needs to know about a customer."""

    customer_id: str
    plan: str
    terms: TermsOverride | None
    period_anchor: datetime | None
    limits: Limits
    breaker: BreakerState
    created_at: datetime
    grandfathered_at: datetime | None = None
    """Kept on its flat plan for good (`meterline migrate grandfather`): `Meterline.plan_of` makes its plan
    unmetered, so it is never billed overage and its calls never reach the sink."""


def _limits(row: CustomerLimits | None) -> Limits:
    if row is None:
        return NO_LIMITS
    return Limits(
        soft_thresholds_pct=None if row.soft_thresholds_pct is None else tuple(json.loads(row.soft_thresholds_pct)),
        hard_limit_ucr=row.hard_limit_ucr,
        hard_limit_usd=None if row.hard_limit_usd is None else Fraction(row.hard_limit_usd),
        block_overage=bool(row.block_overage),
        notify_email=row.notify_email,
        notify_webhook_url=row.notify_webhook_url,
    )


def _breaker(row: BreakerRow | None) -> BreakerState:
    if row is None:
        return CLOSED
    return BreakerState(
        status=BreakerStatus(row.status), since=None if row.since is None else as_utc(row.since),
        reason=row.reason, by=row.by,
        trickle_started=None if row.trickle_started is None else as_utc(row.trickle_started),
        trickle_used=row.trickle_used,
    )


def load_profile(engine: Engine, customer_id: str) -> Profile | None:
    with Session(engine) as session:
        customer = session.get(Customer, customer_id)
        if customer is None:
            return None
        return Profile(
            customer_id=customer.id, plan=customer.plan,
            terms=None if not customer.terms else TermsOverride.model_validate_json(customer.terms),
            period_anchor=None if customer.period_anchor is None else as_utc(customer.period_anchor),
            limits=_limits(session.get(CustomerLimits, customer_id)),
            breaker=_breaker(session.get(BreakerRow, customer_id)),
            created_at=as_utc(customer.created_at),
            grandfathered_at=None if customer.grandfathered_at is None else as_utc(customer.grandfathered_at),
        )


_CUSTOMER_COLUMNS = (Customer.id, Customer.plan, Customer.terms, Customer.period_anchor, Customer.created_at,
                     Customer.grandfathered_at)
_LIMIT_COLUMNS = (CustomerLimits.soft_thresholds_pct, CustomerLimits.hard_limit_ucr, CustomerLimits.hard_limit_usd,
                  CustomerLimits.block_overage, CustomerLimits.notify_email, CustomerLimits.notify_webhook_url)
_BREAKER_COLUMNS = (BreakerRow.status, BreakerRow.since, BreakerRow.reason, BreakerRow.by, BreakerRow.trickle_started,
                    BreakerRow.trickle_used)


def profile_rows(engine: Engine, *, exact: str | None = None) -> list[tuple]:
    """Every customer (or the one named `exact`) as a raw row, in no order, for many at once (the
    fleet). A row is a plain tuple, so a caller can tell an unchanged customer by comparing rows;
    `profile_from` makes one a Profile.

    Three plain reads joined here rather than one outer join: for ten thousand customers the join's
    two index lookups per customer cost SQLite several times the reads (limits and breakers are
    rows for few customers). A change landing between the reads shows in this answer or the next."""
    customers = select(*_CUSTOMER_COLUMNS)
    limits = select(CustomerLimits.customer_id, *_LIMIT_COLUMNS)
    breakers = select(BreakerRow.customer_id, *_BREAKER_COLUMNS)
    if exact is not None:
        customers = customers.where(Customer.id == exact)
        limits = limits.where(CustomerLimits.customer_id == exact)
        breakers = breakers.where(BreakerRow.customer_id == exact)
    with engine.connect() as connection:
        found = connection.execute(customers).all()
        limits_of = {row[0]: tuple(row[1:]) for row in connection.execute(limits)}
        breaker_of = {row[0]: tuple(row[1:]) for row in connection.execute(breakers)}
    no_limits, no_breaker = (None,) * len(_LIMIT_COLUMNS), (None,) * len(_BREAKER_COLUMNS)
    return [(*row, *limits_of.get(row[0], no_limits), *breaker_of.get(row[0], no_breaker)) for row in found]


def profile_from(row: tuple) -> Profile:
    """A Profile from one of `profile_rows`' rows."""
    (customer_id, plan, terms, anchor, created_at, grandfathered_at, soft, hard_ucr, hard_usd, block, email, webhook,
     status, since, reason, by, trickle_started, trickle_used) = row
    limits = NO_LIMITS if (soft, hard_ucr, hard_usd, block, email, webhook) == (None,) * 6 else Limits(
        soft_thresholds_pct=None if soft is None else tuple(json.loads(soft)), hard_limit_ucr=hard_ucr,
        hard_limit_usd=None if hard_usd is None else Fraction(hard_usd), block_overage=bool(block),
        notify_email=email, notify_webhook_url=webhook)
    breaker = CLOSED if status is None else BreakerState(
        status=BreakerStatus(status), since=None if since is None else as_utc(since), reason=reason, by=by,
        trickle_started=None if trickle_started is None else as_utc(trickle_started), trickle_used=trickle_used)
    return Profile(customer_id=customer_id, plan=plan,
                   terms=None if not terms else TermsOverride.model_validate_json(terms),
                   period_anchor=None if anchor is None else as_utc(anchor), limits=limits, breaker=breaker,
                   created_at=as_utc(created_at),
                   grandfathered_at=None if grandfathered_at is None else as_utc(grandfathered_at))


# ---------------------------------------------------------------- limits


def get_limits(engine: Engine, customer_id: str) -> Limits:
    with Session(engine) as session:
        return _limits(session.get(CustomerLimits, customer_id))


def put_limits(engine: Engine, customer_id: str, changes: dict, *, by: str) -> Limits:
    """Apply `changes` (only the fields given; None clears one) and return the limits as stored.
    Setting one kind of hard limit clears the other: a customer has one hard limit."""
    unknown = set(changes) - set(LIMIT_FIELDS)
    if unknown:
        raise StoreError(f"unknown limit field(s): {', '.join(sorted(unknown))}")
    with Session(engine) as session:
        if session.get(Customer, customer_id) is None:
            raise StoreError(f"unknown customer {customer_id!r}")
        row = session.get(CustomerLimits, customer_id) or CustomerLimits(customer_id=customer_id)
        for name, value in changes.items():
            if name == "soft_thresholds_pct":
                value = None if value is None else json.dumps(sorted(set(value)))
            elif name == "hard_limit_usd":
                value = None if value is None else str(value)
            elif name == "block_overage":
                value = bool(value)
            setattr(row, name, value)
        if changes.get("hard_limit_ucr") is not None:
            row.hard_limit_usd = None
        if changes.get("hard_limit_usd") is not None:
            row.hard_limit_ucr = None
        row.updated_at, row.updated_by = utcnow(), by
        session.add(row)
        session.commit()
        session.refresh(row)
        return _limits(row)


# ---------------------------------------------------------------- customers' terms and anchors


def set_terms(engine: Engine, customer_id: str, *, plan: str | None = None, terms: TermsOverride | None = None,
              clear_terms: bool = False, period_anchor: datetime | None = None) -> Customer:
    """Change a customer's plan, own terms (merged over what it had) or billing period anchor."""
    with Session(engine) as session:
        customer = session.get(Customer, customer_id)
        if customer is None:
            raise StoreError(f"unknown customer {customer_id!r}")
        if plan is not None:
            customer.plan = plan
        if clear_terms:
            customer.terms = None
        if terms is not None:
            current = TermsOverride.model_validate_json(customer.terms) if customer.terms else TermsOverride()
            customer.terms = current.merged(terms).to_json()
        if period_anchor is not None:
            customer.period_anchor = period_anchor
        session.add(customer)
        session.commit()
        session.refresh(customer)
        return customer


# ---------------------------------------------------------------- switches


def get_switch(engine: Engine, name: str) -> bool:
    with Session(engine) as session:
        row = session.get(Switch, name)
        return bool(row and row.enabled)


def set_switch(engine: Engine, name: str, enabled: bool, *, by: str) -> None:
    with Session(engine) as session:
        row = session.get(Switch, name) or Switch(name=name)
        row.enabled, row.updated_at, row.updated_by = enabled, utcnow(), by
        session.add(row)
        session.commit()


# ---------------------------------------------------------------- soft-limit notices


def claim_notice(engine: Engine, customer_id: str, period_key: str, threshold_pct: int) -> bool:
    """Record that a threshold fired this period; True only for the first caller, in any process."""
    table = SoftLimitNotice.__table__
    statement = _INSERT[engine.dialect.name](table).values(
        customer_id=customer_id, period=period_key, threshold_pct=threshold_pct, fired_at=utcnow(),
    ).on_conflict_do_nothing().returning(table.c.threshold_pct)  # RETURNING: rowcount is not reliable here
    with engine.begin() as connection:
        return connection.execute(statement).first() is not None


# ---------------------------------------------------------------- circuit breakers


def save_breaker(engine: Engine, customer_id: str, state: BreakerState, transition: Transition | None, *,
                 expected: BreakerStatus | None = None) -> bool:
    """Store a breaker's state and its transition's audit row in one transaction.

    With `expected`, the change is made only if the stored status still is `expected` (compare and
    set): two proxies that see the same runaway trip it once. Returns whether it was stored."""
    values = {
        "status": state.status.value, "since": state.since, "reason": state.reason, "by": state.by,
        "trickle_started": state.trickle_started, "trickle_used": state.trickle_used,
    }
    table = BreakerRow.__table__
    with engine.begin() as connection:
        connection.execute(
            _INSERT[engine.dialect.name](table).values(customer_id=customer_id, status=BreakerStatus.CLOSED.value,
                                                       reason="", by="meterline", trickle_used=0)
            .on_conflict_do_nothing()
        )
        query = update(table).where(table.c.customer_id == customer_id)
        if expected is not None:
            query = query.where(table.c.status == expected.value)
        if connection.execute(query.values(**values)).rowcount != 1:
            return False
        if transition is not None:
            connection.execute(BreakerEvent.__table__.insert().values(
                customer_id=customer_id, before=transition.before.value, after=transition.after.value,
                at=transition.at, by=transition.by, why=transition.why,
            ))
    return True


def get_breaker(engine: Engine, customer_id: str) -> BreakerState:
    with Session(engine) as session:
        return _breaker(session.get(BreakerRow, customer_id))


def breaker_events(engine: Engine, customer_id: str | None = None, limit: int = 100) -> list[BreakerEvent]:
    with Session(engine) as session:
        query = select(BreakerEvent).order_by(BreakerEvent.id.desc()).limit(limit)
        if customer_id is not None:
            query = query.where(BreakerEvent.customer_id == customer_id)
        return list(session.exec(query).scalars())


def open_breakers(engine: Engine) -> list[tuple[str, BreakerState]]:
    with Session(engine) as session:
        rows = session.exec(select(BreakerRow).where(BreakerRow.status != BreakerStatus.CLOSED.value)).scalars()
        return [(row.customer_id, _breaker(row)) for row in rows]

