"""The fleet: every customer's burn in one call (`GET /customers`, the operator console), one
customer's detail (`GET /customers/{id}`) and adding a customer (`POST /customers`).

For thousands of customers per request, the slow parts are kept between requests: recent usage
(plugin/ledger/fleet_usage.py) and what each customer's plan and limits come to (`_Terms`, remade
only when the customer's row changed).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from plugin.ledger import accounts, rollups
from plugin.ledger import store as ledger_store
from plugin.ledger.accounts import GLOBAL_OVERAGE_BLOCK, Profile
from plugin.ledger.fleet_usage import Snapshot
from plugin.rules.limits import usd_limit_as_ucr
from plugin.rules.plans import Period, credits_to_ucr, project_period_total
from plugin.rules.usage import pct
from plugin.runtime import Meterline
from plugin.services.customers import add_customer
from plugin.services.usage import profile_of

MAX_PAGE = 10_000
"""The most customers one call answers (the default: the whole fleet of most operators in one call)."""
MEMBERS = 100
RECENT = 50


@dataclass(frozen=True)
class _Terms:
    """What a customer's plan, own terms and limits come to; remade only when its row changes."""

    profile: Profile
    included_ucr: int
    cap_ucr: int | None
    hard_limit_ucr: int | None
    block_overage: bool


class _TermsCache:
    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple, bool, _Terms]] = {}
        self._lock = threading.Lock()

    def of(self, meterline: Meterline, row: tuple, global_block: bool) -> _Terms:
        known = self._known.get(row[0])
        if known is not None and known[0] == row and known[1] == global_block:
            return known[2]
        profile = accounts.profile_from(row)
        plan = meterline.plan_of(profile)
        limit = meterline.ceiling_of(profile)
        limits = profile.limits
        hard = limits.hard_limit_ucr if limits.hard_limit_usd is None else usd_limit_as_ucr(limits.hard_limit_usd,
                                                                                             plan)
        terms = _Terms(profile=profile, included_ucr=credits_to_ucr(plan.included_credits),
                       cap_ucr=None if limit is None else limit.ucr, hard_limit_ucr=hard,
                       block_overage=plan.has_overage and (limits.block_overage or global_block))
        with self._lock:
            self._known[row[0]] = (row, global_block, terms)
        return terms


def _terms_of(meterline: Meterline) -> _TermsCache:
    """This Meterline's cache (its plans are its own): kept in its instance dict, as its cached properties are."""
    return meterline.__dict__.setdefault("_fleet_terms", _TermsCache())


def burn_ratio(hour_ucr: int, typical_ucr: int) -> float | None:
    """This hour's spend over the typical hour's, two decimals; None without a typical hour."""
    return None if typical_ucr <= 0 else round(hour_ucr / typical_ucr, 2)


def fleet_row(terms: _Terms, period: Period, usage: Snapshot, alerts_open: int) -> dict[str, Any]:
    """One customer as the fleet shows it (DESIGN "Contract: usage API", `GET /customers`), in `period`."""
    profile = terms.profile
    customer_id = profile.customer_id
    used = usage.used_since(customer_id, period.start)
    hourly = usage.hourly(customer_id)
    typical = usage.typical_hour(customer_id, profile.created_at)
    today = usage.used_since(customer_id, usage.now.replace(hour=0, minute=0, second=0, microsecond=0))
    return {
        "customer_id": customer_id,
        "plan": profile.plan,
        "used_ucr": used,
        "included_ucr": terms.included_ucr,
        "included_pct": pct(used, terms.included_ucr),
        "hour_ucr": hourly[-1],
        "today_ucr": today,
        "typical_hour_ucr": typical,
        "burn_ratio": burn_ratio(hourly[-1], typical),
        "projected_ucr": project_period_total(used, period, usage.now),
        "breaker": profile.breaker.status.value,
        "hard_limit_ucr": terms.hard_limit_ucr,
        "cap_ucr": terms.cap_ucr,
        "block_overage": terms.block_overage,
        "alerts_open": alerts_open,
        "hourly_ucr": hourly,
    }


def fleet(meterline: Meterline, now: datetime, *, contains: str | None = None, after: str | None = None,
          limit: int = MAX_PAGE) -> dict[str, Any]:
    """A page of the fleet in customer-id order; `next_cursor` is the id to pass as `after` for the next."""
    rows = accounts.profile_rows(meterline.engine, contains=contains, after=after, limit=limit + 1)
    page = rows[:limit]
    return {"generated_at": now.isoformat(), "customers": _rows(meterline, page, now),
            "next_cursor": page[-1][0] if len(rows) > limit else None}


def _rows(meterline: Meterline, rows: list[tuple], now: datetime) -> list[dict[str, Any]]:
    if not rows:
        return []
    usage = meterline.fleet_usage.snapshot(now)
    alerts = ledger_store.open_alert_counts(meterline.engine)
    global_block = meterline.directory.switch(GLOBAL_OVERAGE_BLOCK)
    cache = _terms_of(meterline)
    periods: dict[datetime | None, Period] = {}  # most customers share the calendar month: compute it once
    answer = []
    for row in rows:
        terms = cache.of(meterline, row, global_block)
        anchor = terms.profile.period_anchor
        if anchor not in periods:
            periods[anchor] = meterline.period(terms.profile, now)
        answer.append(fleet_row(terms, periods[anchor], usage, alerts.get(row[0], 0)))
    return answer


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
