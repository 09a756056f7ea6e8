"""A customer's usage report: one place for the CLI (`meterline usage`) and the HTTP API (`GET /usage`)."""

from __future__ import annotations

from datetime import datetime

from plugin.counters.base import Account
from plugin.ledger import accounts, store
from plugin.rules.limits import usd_limit_as_ucr
from plugin.rules.plans import credits_to_ucr, project_period_total
from plugin.runtime import Meterline


class UnknownCustomer(LookupError):
    pass


def usage_report(meterline: Meterline, customer_id: str, now: datetime) -> dict:
    """The customer's current period as one JSON-ready object (DESIGN.md `usage ID --json`).

    `cap_ucr` is the ceiling requests are held to (plan cap, hard limit, overage blocks), and
    `reserved_ucr` what requests in flight hold under it (only limited customers reserve).
    """
    customer = accounts.load_profile(meterline.engine, customer_id)
    if customer is None:
        raise UnknownCustomer(customer_id)
    plan = meterline.plan_of(customer)
    period = meterline.period(customer, now)
    totals = store.usage_totals(meterline.engine, customer_id, period.start, period.end)
    limit = meterline.ceiling_of(customer)
    cap_ucr = None if limit is None else limit.ucr
    reserved = 0
    if limit is not None:
        reserved = meterline.counters.snapshot(Account(customer_id, period.start), now).reserved_ucr
    limits = customer.limits
    hard_limit_ucr = limits.hard_limit_ucr
    if limits.hard_limit_usd is not None:
        hard_limit_ucr = usd_limit_as_ucr(limits.hard_limit_usd, plan)
    return {
        "customer_id": customer.customer_id,
        "plan": customer.plan,
        "period_start": period.start.isoformat(),
        "period_end": period.end.isoformat(),
        "used_ucr": totals.used_ucr,
        "reserved_ucr": reserved,
        "included_ucr": credits_to_ucr(plan.included_credits),
        "hard_limit_ucr": hard_limit_ucr,
        "cap_ucr": cap_ucr,
        "remaining_ucr": None if cap_ucr is None else max(cap_ucr - totals.used_ucr - reserved, 0),
        "projected_ucr": project_period_total(totals.used_ucr, period, now),
        "requests": totals.requests,
        "saved_ucr": totals.saved_ucr,
        "by_model": totals.by_model,
        "by_action": totals.by_action,
        "by_member": totals.by_member,
        "breaker": customer.breaker.status.value,
    }
