"""Customer usage reports, shared by the CLI and (later) the HTTP API."""

from __future__ import annotations

from datetime import datetime

from plugin.counters.base import Account
from plugin.ledger import store
from plugin.plans import credits_to_ucr, project_period_total
from plugin.runtime import Meterline


class UnknownCustomer(LookupError):
    pass


def usage_report(meterline: Meterline, customer_id: str, now: datetime) -> dict:
    """The customer's current period as one JSON-ready object (DESIGN.md `usage ID --json`).

    `cap_ucr` is the ceiling requests are held to, and `reserved_ucr` what requests in flight hold
    under it (only capped customers reserve). Hard limits and the circuit breaker arrive with the
    limits API; until then no hard limit exists and no breaker can open, and the report says
    exactly that (null, "closed") rather than leaving the contract's fields out.
    """
    customer = store.get_customer(meterline.engine, customer_id)
    if customer is None:
        raise UnknownCustomer(customer_id)
    plan = meterline.config.plans.get(customer.plan)
    period = meterline.period(customer_id, now)
    totals = store.usage_totals(meterline.engine, customer_id, period.start, period.end)
    limit = meterline.ceiling(customer.plan)
    cap_ucr = None if limit is None else limit.ucr
    reserved = 0
    if limit is not None:
        reserved = meterline.counters.snapshot(Account(customer_id, period.start), now).reserved_ucr
    return {
        "customer_id": customer.id,
        "plan": customer.plan,
        "period_start": period.start.isoformat(),
        "period_end": period.end.isoformat(),
        "used_ucr": totals.used_ucr,
        "reserved_ucr": reserved,
        "included_ucr": credits_to_ucr(plan.included_credits) if plan else 0,
        "hard_limit_ucr": None,
        "cap_ucr": cap_ucr,
        "remaining_ucr": None if cap_ucr is None else max(cap_ucr - totals.used_ucr - reserved, 0),
        "projected_ucr": project_period_total(totals.used_ucr, period, now),
        "requests": totals.requests,
        "saved_ucr": totals.saved_ucr,
        "by_model": totals.by_model,
        "by_action": totals.by_action,
        "by_member": totals.by_member,
        "breaker": "closed",
    }
