"""The fleet: every customer's burn in one call (`GET /customers`, the operator console), one
customer's detail (`GET /customers/{id}`) and adding a customer (`POST /customers`).

The console asks for the whole fleet every few seconds, and between two asks most customers did not
change. So the customers' stored rows are kept and read again only when the database's revision
counter for them moved (plugin/ledger/revisions.py), and each customer's fleet row is kept with
what it was made from (its stored row, the global overage switch, its recent usage, its open
alerts, its period) and made again only when one of those differs; only the projection, which
moves with the clock, is computed every time. Recent usage is kept by plugin/ledger/fleet_usage.py.

A kept row is kept as JSON too, all but its projection: the whole fleet's answer is then joined
from bytes. Building ten thousand dicts per request and serializing them cost more than the rest
of the request, and in a proxy process with LiteLLM's millions of objects the garbage collector's
passes they set off cost more again.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any

import orjson

from plugin.ledger import accounts, revisions, rollups
from plugin.ledger import store as ledger_store
from plugin.ledger.accounts import GLOBAL_OVERAGE_BLOCK, Profile
from plugin.ledger.fleet_usage import Snapshot
from plugin.rules.limits import usd_limit_as_ucr
from plugin.rules.plans import Period, credits_to_ucr, project_from_elapsed
from plugin.rules.usage import pct
from plugin.runtime import Meterline
from plugin.services.customers import add_customer
from plugin.services.usage import profile_of

MAX_PAGE = 10_000
"""The most customers one call answers (the default: the whole fleet of most operators in one call)."""
MEMBERS = 100
RECENT = 50


@dataclass(frozen=True, slots=True)
class _Terms:
    """What a customer's plan, own terms and limits come to."""

    profile: Profile
    included_ucr: int
    cap_ucr: int | None
    hard_limit_ucr: int | None
    block_overage: bool


def _terms(meterline: Meterline, row: tuple, global_block: bool) -> _Terms:
    profile = accounts.profile_from(row)
    plan = meterline.plan_of(profile)
    limit = meterline.ceiling_of(profile)
    limits = profile.limits
    hard = limits.hard_limit_ucr if limits.hard_limit_usd is None else usd_limit_as_ucr(limits.hard_limit_usd, plan)
    return _Terms(profile=profile, included_ucr=credits_to_ucr(plan.included_credits),
                  cap_ucr=None if limit is None else limit.ucr, hard_limit_ucr=hard,
                  block_overage=plan.has_overage and (limits.block_overage or global_block))


@dataclass(frozen=True, slots=True)
class _Known:
    """A customer's fleet row as last made, but for its projection, and what it was made from."""

    stored: tuple
    """Its row from accounts.profile_rows."""
    global_block: bool
    terms: _Terms
    made_from: tuple
    """(its usage version, its open alerts, its period's start)."""
    row: dict[str, Any]
    """The fleet row without `projected_ucr`."""
    json_head: bytes
    """`row` as JSON but for its closing brace, followed by `,"projected_ucr":`."""

    @property
    def used_ucr(self) -> int:
        return self.row["used_ucr"]


def _known_rows(meterline: Meterline) -> dict[str, _Known]:
    """This Meterline's kept rows (its plans are its own): in its instance dict, as its cached properties are."""
    return meterline.__dict__.setdefault("_fleet_rows", {})


def burn_ratio(hour_ucr: int, typical_ucr: int) -> float | None:
    """This hour's spend over the typical hour's, two decimals; None without a typical hour."""
    return None if typical_ucr <= 0 else round(hour_ucr / typical_ucr, 2)


def fleet_row(terms: _Terms, period: Period, usage: Snapshot, alerts_open: int) -> dict[str, Any]:
    """One customer as the fleet shows it (DESIGN "Contract: usage API", `GET /customers`), in `period`,
    but for `projected_ucr`: the caller (`_kept`) projects every customer at one instant."""
    profile = terms.profile
    customer_id = profile.customer_id
    used = usage.used_since(customer_id, period.start)
    hourly = usage.hourly(customer_id)
    typical = usage.typical_hour(customer_id, profile.created_at)
    today = usage.used_since(customer_id, usage.now.replace(hour=0, minute=0, second=0, microsecond=0))
    return {
        "customer_id": customer_id,
        "plan": profile.plan,
        "grandfathered_at": None if profile.grandfathered_at is None else profile.grandfathered_at.isoformat(),
        "used_ucr": used,
        "included_ucr": terms.included_ucr,
        "included_pct": pct(used, terms.included_ucr),
        "hour_ucr": hourly[-1],
        "today_ucr": today,
        "typical_hour_ucr": typical,
        "burn_ratio": burn_ratio(hourly[-1], typical),
        "breaker": profile.breaker.status.value,
        "hard_limit_ucr": terms.hard_limit_ucr,
        "cap_ucr": terms.cap_ucr,
        "block_overage": terms.block_overage,
        "alerts_open": alerts_open,
        "hourly_ucr": hourly,
    }


@dataclass(frozen=True, slots=True)
class _Customers:
    """Every customer's stored row in id order, as of a revision of the customers' tables."""

    revision: int | None
    rows: list[tuple]
    ids: list[str]


def _customers(meterline: Meterline) -> _Customers:
    revision = revisions.current(meterline.engine, revisions.CUSTOMERS)  # before the rows: plugin/ledger/revisions.py
    kept = meterline.__dict__.get("_fleet_customers")
    if kept is None or revision is None or kept.revision != revision:
        rows = sorted(accounts.profile_rows(meterline.engine), key=itemgetter(0))
        kept = meterline.__dict__["_fleet_customers"] = _Customers(revision, rows, [row[0] for row in rows])
    return kept


def fleet_json(meterline: Meterline, now: datetime, *, contains: str | None = None, after: str | None = None,
               limit: int = MAX_PAGE) -> bytes:
    """A page of the fleet, as JSON, in customer-id order (of code points); `next_cursor` is the id to
    pass as `after` for the next page. `contains` matches ids regardless of case."""
    customers = _customers(meterline)
    rows = customers.rows if after is None else customers.rows[bisect_right(customers.ids, after):]
    if contains:
        wanted = contains.casefold()
        rows = [row for row in rows if wanted in row[0].casefold()]
    page = rows[:limit]
    customers = b",".join(b"%b%d}" % (known.json_head, projected) for known, projected in _kept(meterline, page, now))
    return b'{"generated_at":%b,"customers":[%b],"next_cursor":%b}' % (
        orjson.dumps(now.isoformat()), customers, orjson.dumps(page[-1][0] if len(rows) > limit else None))


def fleet(meterline: Meterline, now: datetime, *, contains: str | None = None, after: str | None = None,
          limit: int = MAX_PAGE) -> dict[str, Any]:
    """`fleet_json`, parsed (for callers other than the HTTP API)."""
    return orjson.loads(fleet_json(meterline, now, contains=contains, after=after, limit=limit))


def _rows(meterline: Meterline, rows: list[tuple], now: datetime) -> list[dict[str, Any]]:
    return [known.row | {"projected_ucr": projected} for known, projected in _kept(meterline, rows, now)]


def _kept(meterline: Meterline, rows: list[tuple], now: datetime) -> Iterator[tuple[_Known, int]]:
    """Each customer's kept row (made again where anything it shows changed) and its projection now."""
    if not rows:
        return
    usage = meterline.fleet_usage.snapshot(now)
    alerts = ledger_store.open_alert_counts(meterline.engine)
    global_block = meterline.directory.switch(GLOBAL_OVERAGE_BLOCK)
    known_rows = _known_rows(meterline)
    periods: dict[datetime | None, tuple[Period, int, int]] = {}  # most customers share the calendar month
    for stored in rows:
        customer_id = stored[0]
        known = known_rows.get(customer_id)
        if known is not None and known.stored == stored and known.global_block == global_block:
            terms = known.terms
        else:
            terms = _terms(meterline, stored, global_block)
        anchor = terms.profile.period_anchor
        if anchor not in periods:
            period = meterline.period(terms.profile, now)
            periods[anchor] = period, period.seconds, int((now - period.start).total_seconds())
        period, seconds, elapsed = periods[anchor]
        made_from = (usage.version(customer_id), alerts.get(customer_id, 0), period.start)
        if known is None or known.terms is not terms or known.made_from != made_from:
            row = fleet_row(terms, period, usage, made_from[1])
            known = known_rows[customer_id] = _Known(stored, global_block, terms, made_from, row,
                                                     orjson.dumps(row)[:-1] + b',"projected_ucr":')
        yield known, project_from_elapsed(known.used_ucr, seconds, elapsed)


def customer_detail(meterline: Meterline, customer_id: str, now: datetime) -> dict[str, Any]:
    """One customer's fleet row, plus its members this period, its last ledger rows and its breaker's history."""
    profile_of(meterline, customer_id)  # UnknownCustomer when there is none
    rows = accounts.profile_rows(meterline.engine, exact=customer_id)
    detail = _rows(meterline, rows, now)[0]
    period = meterline.period(accounts.profile_from(rows[0]), now)
    members = rollups.breakdown(meterline.engine, customer_id, period.start, period.end).by["member"]
    ranked = sorted(members.items(), key=lambda item: (-item[1].credits_ucr, item[0]))[:MEMBERS]
    return detail | {
        "members": [{"member": name, "used_ucr": tally.credits_ucr, "requests": tally.requests}
                    for name, tally in ranked],
        "recent": [ledger_store.export_row(entry)
                   for entry in ledger_store.recent_rows(meterline.engine, customer_id, RECENT)],
        "breaker_history": [
            {"at": ledger_store.as_utc(event.at).isoformat(), "before": event.before, "after": event.after,
             "by": event.by, "why": event.why}
            for event in accounts.breaker_events(meterline.engine, customer_id, limit=100)],
    }


def create_customer(meterline: Meterline, customer_id: str, plan: str, stripe_customer_id: str | None,
                    now: datetime) -> dict[str, Any]:
    """Add a customer (UnknownPlan, or StoreError when it exists); its fleet row."""
    add_customer(meterline, customer_id, plan, stripe_customer_id)
    return _rows(meterline, accounts.profile_rows(meterline.engine, exact=customer_id), now)[0]
