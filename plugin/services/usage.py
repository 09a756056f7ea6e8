"""A customer's usage: one place for the CLI (`meterline usage`), the HTTP API (`GET /usage`,
`GET /customers/{id}/usage`, `GET /usage/daily`) and the customer's usage page.

Every figure comes from the ledger's rollups (plugin/ledger/rollups.py), never from Stripe, so it
equals `meterline ledger export` summed over the same rows, and costs the same for any number of rows.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from plugin.counters.base import Account
from plugin.ledger import accounts, reconciliations, rollups
from plugin.ledger.accounts import Profile
from plugin.rules.limits import usd_limit_as_ucr
from plugin.rules.plans import Period, credits_to_ucr, project_period_total
from plugin.rules.rollups import DAY, NOTHING, start_of, unit_of
from plugin.rules.usage import (
    overage_rates,
    overage_ucr,
    pct,
    projected_overage_usd,
    projected_usd,
    top_actions,
)
from plugin.runtime import Meterline
from plugin.services.limits import limits_json

Which = Literal["current", "previous"]


class UnknownCustomer(LookupError):
    pass


def profile_of(meterline: Meterline, customer_id: str) -> Profile:
    customer = accounts.load_profile(meterline.engine, customer_id)
    if customer is None:
        raise UnknownCustomer(customer_id)
    return customer


def period_of(meterline: Meterline, customer: Profile, now: datetime, which: Which = "current",
              at: datetime | None = None) -> Period:
    """The period holding `at`, else the current one or the one before it."""
    if at is not None:
        return meterline.period(customer, at)
    current = meterline.period(customer, now)
    return current if which == "current" else meterline.period(customer, current.start - timedelta(microseconds=1))


def _date(day: int) -> str:
    return start_of(day, DAY).date().isoformat()


def days_between(first_day: int, last_day: int, daily: dict) -> list[dict[str, Any]]:
    """Every UTC day from first to last (inclusive), oldest first, zeros included."""
    return [{"date": _date(day), "used_ucr": daily.get(day, NOTHING).credits_ucr,
             "requests": daily.get(day, NOTHING).requests} for day in range(first_day, last_day + 1)]


def usage_report(meterline: Meterline, customer_id: str, now: datetime, which: Which = "current",
                 at: datetime | None = None) -> dict[str, Any]:
    """A customer's period as one JSON-ready object (DESIGN "Contract: usage API", a superset of
    `usage ID --json`). `cap_ucr` is the ceiling requests are held to (plan cap, hard limit,
    overage blocks), and `reserved_ucr` what requests in flight hold under it (current period only)."""
    customer = profile_of(meterline, customer_id)
    plan = meterline.plan_of(customer)
    period = period_of(meterline, customer, now, which, at)
    used = rollups.breakdown(meterline.engine, customer_id, period.start, period.end)
    limit = meterline.ceiling_of(customer)
    cap_ucr = None if limit is None else limit.ucr
    is_current = period.start <= now < period.end
    reserved = 0
    if limit is not None and is_current:
        reserved = meterline.counters.snapshot(Account(customer_id, period.start), now).reserved_ucr
    limits = customer.limits
    hard_limit_ucr = limits.hard_limit_ucr
    if limits.hard_limit_usd is not None:
        hard_limit_ucr = usd_limit_as_ucr(limits.hard_limit_usd, plan)
    included = credits_to_ucr(plan.included_credits)
    used_ucr = used.total.credits_ucr
    projected = project_period_total(used_ucr, period, now) if is_current else used_ucr
    by_name = {dimension: {name: tally.credits_ucr for name, tally in found.items()}
               for dimension, found in used.by.items()}
    last = min(now, period.end - timedelta(microseconds=1)) if now >= period.start else period.start
    return {
        "customer_id": customer.customer_id,
        "plan": customer.plan,
        "grandfathered_at": None if customer.grandfathered_at is None else customer.grandfathered_at.isoformat(),
        "period_start": period.start.isoformat(),
        "period_end": period.end.isoformat(),
        "used_ucr": used_ucr,
        "reserved_ucr": reserved,
        "included_ucr": included,
        "included_pct": pct(used_ucr, included),
        "overage_ucr": overage_ucr(used_ucr, included) if plan.has_overage else 0,
        "hard_limit_ucr": hard_limit_ucr,
        "cap_ucr": cap_ucr,
        "remaining_ucr": None if cap_ucr is None else max(cap_ucr - used_ucr - reserved, 0),
        "projected_ucr": projected,
        "projected_usd": projected_usd(plan, projected, cap_ucr),
        "projected_overage_usd": projected_overage_usd(plan, projected, cap_ucr),
        "overage_rates": overage_rates(plan, used_ucr),
        "currency": "usd",
        "requests": used.total.requests,
        "saved_ucr": used.total.saved_ucr,
        "by_model": by_name["model"],
        "by_action": by_name["action"],
        "by_member": by_name["member"],
        "top_actions": top_actions(by_name["action"]),
        "daily": days_between(unit_of(period.start, DAY), unit_of(last, DAY), used.daily),
        "breaker": customer.breaker.status.value,
        "limits": limits_json(meterline, customer),
        "stripe": reconciliations.stripe_field(meterline.engine, customer_id, period.start, period.end),
    }


def usage_daily(meterline: Meterline, customer_id: str, now: datetime, days: int) -> dict[str, Any]:
    """The last `days` UTC days up to today, oldest first, zeros included (`GET /usage/daily`)."""
    customer = profile_of(meterline, customer_id)
    today = unit_of(now, DAY)
    first = today - days + 1
    used = rollups.breakdown(meterline.engine, customer_id, start_of(first, DAY), start_of(today + 1, DAY))
    return {"customer_id": customer_id, "included_ucr": credits_to_ucr(meterline.plan_of(customer).included_credits),
            "days": days_between(first, today, used.daily)}
